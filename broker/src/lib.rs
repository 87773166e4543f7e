//! knsq broker
