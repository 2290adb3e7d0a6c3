//! W3C trace context (`traceparent`, version 00, and `tracestate`): the pure type, parsed,
//! formatted and derived. No I/O: recording and exporting spans is `conveyor_api::trace`'s
//! business.
//!
//! `traceparent: 00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`
//! (<https://www.w3.org/TR/trace-context/#traceparent-header>). `tracestate` is vendor data
//! that travels with it unchanged (<https://www.w3.org/TR/trace-context/#tracestate-header>).

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

/// The header name, on HTTP requests, gRPC metadata and in [`Event::headers`](crate::Event).
pub const TRACEPARENT: &str = "traceparent";

/// The vendor-specific companion of [`TRACEPARENT`], carried unchanged next to it.
pub const TRACESTATE: &str = "tracestate";

/// The `sampled` trace flag.
pub const SAMPLED: u8 = 0x01;

/// One position in a trace: the trace it belongs to and the span that is the parent of
/// whatever is done next with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Reads a `traceparent` value. Version 00 must be exactly 55 characters; a later version
    /// is read by its first four fields (as the spec asks); version `ff`, upper-case hex and
    /// all-zero ids are refused.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let value = value.trim();
        let bytes = value.as_bytes();
        if bytes.len() < 55 {
            return None;
        }
        let version = hex_byte(&bytes[0..2])?;
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if version != 0 && bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, byte) in trace_id.iter_mut().enumerate() {
            *byte = hex_byte(&bytes[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, byte) in span_id.iter_mut().enumerate() {
            *byte = hex_byte(&bytes[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&bytes[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace (random trace id and span id), sampled.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: random_trace_id(),
            span_id: random_span_id(),
            flags: SAMPLED,
        }
    }

    /// The same trace and flags with a new span id: the context of a span whose parent is
    /// `self.span_id`.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: random_span_id(),
            ..*self
        }
    }

    /// The `traceparent` value (always version 00).
    pub fn header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }

    /// Whether the `sampled` flag is set: the caller (or the door's sampler) decided that
    /// this trace is recorded.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The same context with the `sampled` flag set to `sampled`.
    pub fn with_sampled(self, sampled: bool) -> TraceContext {
        let flags = if sampled {
            self.flags | SAMPLED
        } else {
            self.flags & !SAMPLED
        };
        TraceContext { flags, ..self }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// A `tracestate` value worth passing on: at most 32 comma-separated `key=value` members
/// and 512 characters, printable ASCII (the spec's limits; a value that breaks them is
/// dropped, as the spec allows). Returns it trimmed.
pub fn valid_tracestate(value: &str) -> Option<&str> {
    let value = value.trim();
    if value.is_empty() || value.len() > 512 || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    let mut members = 0;
    for member in value.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let (key, val) = member.split_once('=')?;
        if key.is_empty() || val.is_empty() || key.contains(' ') {
            return None;
        }
        members += 1;
    }
    (1..=32).contains(&members).then_some(value)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

thread_local! {
    /// splitmix64 state, seeded per thread from std's randomly keyed hasher and the clock.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.finish()
}

pub(crate) fn next_u64() -> u64 {
    RNG.with(|state| {
        let mut z = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A random, non-zero span id. Not cryptographic: ids need to be unique, not secret.
pub fn random_span_id() -> [u8; 8] {
    loop {
        let id = next_u64();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A random, non-zero trace id.
pub fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next_u64().to_be_bytes());
    id[8..].copy_from_slice(&random_span_id());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example() {
        let ctx = TraceContext::parse(SPEC).expect("the spec's example parses");
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(ctx.flags, SAMPLED);
        assert_eq!(ctx.header(), SPEC);
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_a_later_version_by_its_first_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        let ctx = TraceContext::parse(later).expect("a later version parses");
        assert_eq!(ctx.header(), SPEC);
    }

    #[test]
    fn the_sampled_flag_is_read_and_set() {
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("parses");
        assert!(!unsampled.sampled());
        assert!(unsampled.child().with_sampled(true).sampled());
        assert!(!TraceContext::new_root().with_sampled(false).sampled());
    }

    #[test]
    fn tracestate_is_kept_within_the_spec_limits() {
        assert_eq!(
            valid_tracestate(" rojo=00f067aa0ba902b7,congo=t61rcWkgMzE "),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(valid_tracestate(""), None);
        assert_eq!(valid_tracestate("novalue"), None);
        assert_eq!(valid_tracestate(&"k=v,".repeat(33)), None);
        assert_eq!(valid_tracestate(&format!("k={}", "x".repeat(600))), None);
    }

    #[test]
    fn children_keep_the_trace_and_get_new_span_ids() {
        let root = TraceContext::new_root();
        assert_ne!(root.trace_id, [0; 16]);
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(TraceContext::parse(&child.header()), Some(child));
        let other = TraceContext::new_root();
        assert_ne!(other.trace_id, root.trace_id);
    }
}
