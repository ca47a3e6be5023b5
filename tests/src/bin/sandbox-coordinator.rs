//! The coordinator binary as built for the sandbox's end-to-end tests.

fn main() -> std::process::ExitCode {
    drover_coordinator::cli_main()
}
