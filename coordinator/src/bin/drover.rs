//! `drover`: the command-line client (see `drover --help`).

#[global_allocator]
static ALLOCATOR: drover_shared::Allocator = drover_shared::Allocator;

fn main() -> std::process::ExitCode {
    drover_coordinator::client::cli_main()
}
