//! The `drover` client as built for the sandbox's end-to-end tests.

fn main() -> std::process::ExitCode {
    drover_coordinator::client::cli_main()
}
