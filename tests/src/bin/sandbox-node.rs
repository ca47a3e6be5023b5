//! The node binary as built for the sandbox's end-to-end tests.

fn main() -> std::process::ExitCode {
    drover_node::cli_main()
}
