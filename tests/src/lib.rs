//! knsq test harness
