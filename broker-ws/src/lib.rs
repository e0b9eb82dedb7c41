//! broker-ws (in progress)
