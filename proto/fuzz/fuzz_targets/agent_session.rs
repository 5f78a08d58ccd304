//! Feeds arbitrary bytes, split at an arbitrary point, through the agent's
//! frame buffer and control session, as the agent's driver does (wake
//! requests included): any byte sequence ends in frames, events or an
//! error, never a panic.
#![no_main]

use burrow_proto::{AgentSession, EdgeToAgent, FrameBuf, Name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let cut = usize::from(split).min(data.len());
    let mut buf = FrameBuf::new();
    let agent = Name::new("home").expect("a valid name");
    let mut session = AgentSession::new(agent, 1, Vec::new());
    while session.poll_transmit().is_some() {}
    for part in [&data[..cut], &data[cut..]] {
        for chunk in part.chunks(FrameBuf::CAPACITY) {
            if chunk.len() > buf.space() {
                return;
            }
            buf.push(chunk);
            loop {
                match buf.next_frame::<EdgeToAgent>() {
                    Ok(Some(frame)) => {
                        if session.handle_frame(frame).is_err() {
                            return;
                        }
                        while session.poll_transmit().is_some() {}
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
});
