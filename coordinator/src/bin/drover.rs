//! `drover`: the command-line client (see `drover --help`).

fn main() -> std::process::ExitCode {
    drover_coordinator::client::cli_main()
}
