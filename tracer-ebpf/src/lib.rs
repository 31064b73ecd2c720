#![no_std]
// This library target exists only so that `tracer` can name this package as a build dependency
// (cargo then rebuilds the agent when the programs change); the programs are in main.rs.
