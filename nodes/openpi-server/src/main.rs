//! The `openpi-server` dora node; inputs, outputs and env are in README.md.

fn main() -> eyre::Result<()> {
    let (node, events) = dora_node_api::DoraNode::init_from_env()?;
    openpi_server::run(node, events)
}
