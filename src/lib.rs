//! rmboost (work in progress).
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod backend;
mod error;

pub use async_trait::async_trait;
pub use backend::{
    Completion, CompletionRequest, FinishReason, LlmBackend, Message, Role, SamplingParams, Usage,
};
pub use error::{BackendError, BackendErrorKind, BoxError, Error, UnusableReason};
