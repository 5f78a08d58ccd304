//! Decodes arbitrary bytes as `StreamOpen`: never panics, never reads past what
//! it reports using, and whatever decodes re-encodes to a frame that decodes
//! to the same value.
#![no_main]

use burrow_proto::{Frame, StreamOpen};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = StreamOpen::decode(data) {
        assert!(used <= data.len());
        let bytes = frame.to_bytes();
        let (again, used_again) = StreamOpen::decode(&bytes)
            .expect("re-encoded frame decodes")
            .expect("re-encoded frame is complete");
        assert_eq!(again, frame);
        assert_eq!(used_again, bytes.len());
    }
});
