//! The integration tests, one binary: a module per area (the test names are `module::test`)
//! and the helpers they share (`support`), compiled and linked once.
//!
//! Tests run on the threads of one process: a test that needs something of the process (an
//! environment variable, its own Ctrl-C handling) runs it in a child (`crash`, `secrets`).

mod support;

#[cfg(feature = "middleware")]
mod adaptive;
#[cfg(feature = "anthropic")]
mod anthropic_http;
mod bad_input;
#[cfg(feature = "test-util")]
mod baselines;
#[cfg(feature = "openai")]
mod baselines_llamacpp;
#[cfg(feature = "cli")]
mod batch_run;
#[cfg(all(feature = "openai", feature = "anthropic"))]
mod batch_server;
#[cfg(all(feature = "cache", feature = "test-util"))]
mod cache;
#[cfg(feature = "cli")]
mod cli;
#[cfg(feature = "cli")]
mod cli_http;
#[cfg(all(feature = "cli", feature = "local"))]
mod cli_local;
#[cfg(all(feature = "run", feature = "test-util"))]
mod crash;
mod examples;
#[cfg(feature = "parquet")]
mod export;
#[cfg(all(feature = "run", feature = "test-util"))]
mod faults;
#[cfg(all(feature = "openai", feature = "run", feature = "test-util"))]
mod faults_http;
#[cfg(all(feature = "run", feature = "test-util", unix))]
mod file_safety;
mod generator;
#[cfg(feature = "openai")]
mod llama_server;
#[cfg(feature = "local")]
mod local_model;
#[cfg(feature = "openai")]
mod openai_http;
#[cfg(feature = "middleware")]
mod rate_limit;
#[cfg(feature = "test-util")]
mod report;
#[cfg(feature = "middleware")]
mod retry;
#[cfg(all(feature = "run", feature = "test-util"))]
mod run;
#[cfg(all(feature = "openai", feature = "anthropic"))]
mod secrets;
#[cfg(feature = "cli")]
mod slurm;
