//! The sinks that need nothing at all: standard output, and a blackhole for benchmarks (the
//! file sink is in `file`).

use std::io::Write;

use async_trait::async_trait;
use conveyor_core::Event;

use crate::record::render;
use crate::{Sink, SinkError};

/// Writes records to standard output.
pub struct StdoutSink;

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let bytes = render(events, processed_at_ms);
        let failed = |message: String| SinkError::retryable("stdout", message);
        // A pipe whose reader is slow blocks the write: off the runtime, like the file sink.
        tokio::task::spawn_blocking(move || {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&bytes).and_then(|()| stdout.flush())
        })
        .await
        .map_err(|e| failed(format!("the write task failed: {e}")))?
        .map_err(|e| failed(e.to_string()))
    }

    fn describe(&self) -> String {
        "stdout".into()
    }
}

/// Discards events (for benchmarks and dry runs); confirms at once.
pub struct BlackholeSink;

#[async_trait]
impl Sink for BlackholeSink {
    async fn write(&self, _events: &[Event], _processed_at_ms: u64) -> Result<(), SinkError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "blackhole".into()
    }
}
