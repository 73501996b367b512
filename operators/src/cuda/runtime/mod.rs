//! What the stages run on: the device, streams and buffers (one copy helper per direction),
//! CUDA graphs (one capture routine and cache), the GEMM picks shared across processes, and
//! the CUDA IPC rings between processes.

pub mod device;
pub mod graph;
pub mod ipc;
pub mod plans;
