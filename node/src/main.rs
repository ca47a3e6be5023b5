//! `drover-node`: see the crate docs of `drover_node`.

fn main() -> std::process::ExitCode {
    drover_node::cli_main()
}
