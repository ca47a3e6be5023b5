//! `drover`: the command-line client (see `drover --help`).

fn main() -> std::process::ExitCode {
    drover_cli::cli_main()
}
