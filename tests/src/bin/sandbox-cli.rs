//! The `drover` client as built for the sandbox's end-to-end tests.

#[global_allocator]
static ALLOCATOR: drover_shared::Allocator = drover_shared::Allocator;

fn main() -> std::process::ExitCode {
    drover_cli::cli_main()
}
