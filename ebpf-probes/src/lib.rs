//! Placeholder: eBPF telemetry and the XDP drop list are not built yet (see README.md).
