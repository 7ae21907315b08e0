//! The handover stream's framing: length-prefixed frames (`kind ‖ u32 length ‖ body`) and one
//! `SCM_RIGHTS` message carrying every descriptor, through `rustix` (no `unsafe` here).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context, Result};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use zeroize::Zeroizing;

/// The kernel's limit of descriptors in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;
/// The largest frame either side accepts (the manifest and the ticket keys are far smaller).
const MAX_FRAME: usize = 1 << 20;

/// Frame kinds.
pub const HELLO: u8 = b'H';
pub const MANIFEST: u8 = b'M';
pub const FDS: u8 = b'F';
pub const TICKETS: u8 = b'T';
pub const READY: u8 = b'R';
pub const ACK: u8 = b'A';
pub const REFUSED: u8 = b'E';

/// Sends one frame.
pub fn send_frame(sock: &mut UnixStream, kind: u8, body: &[u8]) -> Result<()> {
    let len = u32::try_from(body.len()).context("handover frame too large")?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_be_bytes());
    sock.write_all(&head)
        .and_then(|()| sock.write_all(body))
        .and_then(|()| sock.flush())
        .context("handover: cannot send")
}

/// Reads one frame; its body is wiped on drop (it may hold ticket keys).
pub fn recv_frame(sock: &mut UnixStream) -> Result<(u8, Zeroizing<Vec<u8>>)> {
    let mut head = [0u8; 5];
    sock.read_exact(&mut head)
        .context("handover: the other process closed the connection")?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        bail!("handover: a frame of {len} bytes is too large");
    }
    let mut body = Zeroizing::new(vec![0u8; len]);
    sock.read_exact(&mut body)
        .context("handover: the other process closed the connection")?;
    Ok((head[0], body))
}

/// Reads a frame that must be of `kind`; a `REFUSED` frame becomes its message as the error.
pub fn expect_frame(sock: &mut UnixStream, kind: u8) -> Result<Zeroizing<Vec<u8>>> {
    let (got, body) = recv_frame(sock)?;
    if got == REFUSED {
        bail!("{}", String::from_utf8_lossy(&body));
    }
    if got != kind {
        bail!(
            "handover: expected frame {:?}, got {:?}",
            kind as char,
            got as char
        );
    }
    Ok(body)
}

/// Sends `fds` as one `SCM_RIGHTS` message riding on a one-byte `FDS` marker.
pub fn send_fds(sock: &UnixStream, fds: &[BorrowedFd<'_>]) -> Result<()> {
    if fds.len() > MAX_FDS {
        bail!(
            "handover: {} sockets exceed the {MAX_FDS} one message can carry",
            fds.len()
        );
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        bail!("handover: the descriptors do not fit the control buffer");
    }
    let sent = sendmsg(
        sock,
        &[IoSlice::new(&[FDS])],
        &mut control,
        SendFlags::empty(),
    )
    .context("handover: sendmsg(SCM_RIGHTS)")?;
    if sent != 1 {
        bail!("handover: sendmsg sent {sent} bytes");
    }
    Ok(())
}

/// Receives the `FDS` marker and exactly `expected` descriptors (close-on-exec).
pub fn recv_fds(sock: &UnixStream, expected: usize) -> Result<Vec<OwnedFd>> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got = recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .context("handover: recvmsg(SCM_RIGHTS)")?;
    if got.bytes != 1 || byte[0] != FDS {
        bail!("handover: expected the sockets, got something else");
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        bail!("handover: the descriptors were cut short");
    }
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if fds.len() != expected {
        bail!(
            "handover: expected {expected} descriptors, received {}",
            fds.len()
        );
    }
    Ok(fds)
}
