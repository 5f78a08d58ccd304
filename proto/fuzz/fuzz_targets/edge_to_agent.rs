//! Decodes arbitrary bytes as `EdgeToAgent`: never panics, never reads past what
//! it reports using, and whatever decodes re-encodes to a frame that decodes
//! to the same value.
#![no_main]

use burrow_proto::{Frame, EdgeToAgent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = EdgeToAgent::decode(data) {
        assert!(used <= data.len());
        let bytes = frame.to_bytes();
        let (again, used_again) = EdgeToAgent::decode(&bytes)
            .expect("re-encoded frame decodes")
            .expect("re-encoded frame is complete");
        assert_eq!(again, frame);
        assert_eq!(used_again, bytes.len());
    }
});
