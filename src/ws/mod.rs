//! The WebSocket layer under axum's upgrade: the opening handshake, RFC 6455 framing and a
//! lean socket.
//!
//! Why not axum's `WebSocket` (tokio-tungstenite): the fan-out profile showed its per-frame
//! path (frame formatting into a buffer that is zero-filled on every read, one allocation-heavy
//! `Message` per frame) among the top costs, and its per-connection buffers, allocated up front
//! and never released, were most of an idle connection's memory. This layer keeps no buffer for
//! an idle connection, writes every queued frame of a drain in one `write`, and still refuses
//! everything RFC 6455 says a server must refuse. Details and figures: docs/ARCHITECTURE.md and
//! docs/BENCHMARKS.md.

pub(crate) mod frame;
pub(crate) mod handshake;
mod socket;

pub(crate) use socket::{Message, WebSocket, WsError};
