//! The `action-queue` dora node; inputs, outputs and env are in README.md.

fn main() -> eyre::Result<()> {
    let (node, events) = dora_node_api::DoraNode::init_from_env()?;
    action_queue::run(node, events)
}
