//! `drover-coordinator`: see the crate docs of `drover_coordinator`.

fn main() -> std::process::ExitCode {
    drover_coordinator::cli_main()
}
