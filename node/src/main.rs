//! `drover-node`: see the crate docs of `drover_node`.

#[global_allocator]
static ALLOCATOR: drover_shared::Allocator = drover_shared::Allocator;

fn main() -> std::process::ExitCode {
    drover_node::cli_main()
}
