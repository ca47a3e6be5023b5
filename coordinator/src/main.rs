//! `drover-coordinator`: see the crate docs of `drover_coordinator`.

#[global_allocator]
static ALLOCATOR: drover_shared::Allocator = drover_shared::Allocator;

fn main() -> std::process::ExitCode {
    drover_coordinator::cli_main()
}
