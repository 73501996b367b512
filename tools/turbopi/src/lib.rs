//! The parts of the `turbopi` command line that read dataflow graphs and span files, as a
//! library: the binary uses them, and the fuzz tests (tests/fuzz.rs) call them in-process.

pub mod graph;
pub mod plan;
pub mod trace;
