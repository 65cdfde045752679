//! The CPU collective backend: a star of TCP connections through rank 0.
//!
//! Rank 0 listens; every other rank connects once and says who it is (rank, world size, generation). Each
//! operation is one round through rank 0: the others send their part, rank 0 combines the parts in rank
//! order and sends the result back. For the small groups a CPU host runs (2 to 4 ranks) a star moves as
//! many bytes as a ring and keeps the reduction order fixed without extra work. Frames are a 4-byte
//! little-endian length and the payload; floats travel as little-endian bytes. Every read and write is
//! bounded by the group's timeout; Nagle is off (collectives are latency-bound). After any failure the
//! backend shuts its sockets, so every peer sees the failure at its next operation instead of waiting.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::collective::{Collective, CollectiveError, CollectiveStats};

const MAGIC: &[u8; 4] = b"SPTP";
const VERSION: u32 = 1;
/// No frame is larger than this (a gather of logits for a long verify of a large vocabulary fits).
const MAX_FRAME: usize = 1 << 30;

/// One rank's end of a TCP star.
#[derive(Debug)]
pub struct TcpCollective {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: the link to rank `i + 1` at index `i`. Other ranks: the link to rank 0.
    links: Vec<Mutex<TcpStream>>,
    failed: Mutex<Option<String>>,
    stats: CollectiveStats,
}

fn hello(rank: usize, world: usize, generation: u64) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(rank as u32).to_le_bytes());
    b.extend_from_slice(&(world as u32).to_le_bytes());
    b.extend_from_slice(&generation.to_le_bytes());
    b
}

fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

fn io_error(peer: usize, timeout: Duration, e: std::io::Error) -> CollectiveError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout { peer, timeout },
        _ => CollectiveError::PeerGone {
            peer,
            cause: e.to_string(),
        },
    }
}

fn write_frame(s: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 4];
    head.copy_from_slice(&(payload.len() as u32).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    let n = u32::from_le_bytes(head) as usize;
    if n > MAX_FRAME {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {n} bytes is over the limit"),
        ));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(v.len() * 4);
    for x in v {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl TcpCollective {
    /// Rank 0: waits on `listener` until ranks `1..world` have all joined with this `generation`, or
    /// `timeout` passes. A connection that says the wrong thing is refused and the wait goes on.
    pub fn lead(
        listener: TcpListener,
        world: usize,
        generation: u64,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if world == 0 {
            return Err(CollectiveError::Rendezvous("world size 0".into()));
        }
        let rendezvous = |e: std::io::Error| CollectiveError::Rendezvous(e.to_string());
        listener.set_nonblocking(true).map_err(rendezvous)?;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            let (mut s, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| i + 1)
                            .collect();
                        return Err(CollectiveError::Rendezvous(format!(
                            "ranks {missing:?} of {world} did not join within {timeout:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(rendezvous(e)),
            };
            s.set_nonblocking(false).map_err(rendezvous)?;
            configure(&s, timeout).map_err(rendezvous)?;
            // A stranger that connects and says nothing must not hold up the group for long.
            s.set_read_timeout(Some(timeout.min(Duration::from_secs(5))))
                .map_err(rendezvous)?;
            let mut h = [0u8; 24];
            let greeted = s.read_exact(&mut h);
            s.set_read_timeout(Some(timeout)).map_err(rendezvous)?;
            if greeted.is_err() {
                tracing::warn!(%from, "tensor-parallel rendezvous: a connection sent no greeting");
                continue;
            }
            let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
            let (rank, their_world) = (u32_at(8) as usize, u32_at(12) as usize);
            let their_gen = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
            let refusal = if &h[..4] != MAGIC || u32_at(4) != VERSION {
                Some("not a specd tensor-parallel peer of this version".to_string())
            } else if their_world != world || their_gen != generation {
                Some(format!(
                    "group mismatch: peer says world {their_world} generation {their_gen}, \
                     leader has world {world} generation {generation}"
                ))
            } else if rank == 0 || rank >= world {
                Some(format!("rank {rank} is not in 1..{world}"))
            } else if peers[rank - 1].is_some() {
                Some(format!("rank {rank} has already joined"))
            } else {
                None
            };
            match refusal {
                Some(why) => {
                    tracing::warn!(%from, %why, "tensor-parallel rendezvous: refused a peer");
                    let mut reply = vec![1u8];
                    reply.extend_from_slice(why.as_bytes());
                    let _ = write_frame(&mut s, &reply);
                }
                None => peers[rank - 1] = Some(s),
            }
        }
        let mut links = Vec::with_capacity(world - 1);
        for (i, p) in peers.into_iter().enumerate() {
            let mut s = p.expect("every rank joined");
            write_frame(&mut s, &[0u8]).map_err(|e| io_error(i + 1, timeout, e))?;
            links.push(Mutex::new(s));
        }
        Ok(Self {
            rank: 0,
            world,
            timeout,
            links,
            failed: Mutex::new(None),
            stats: CollectiveStats::default(),
        })
    }

    /// Rank `rank > 0`: connects to rank 0 at `addr` (retrying while it is not listening yet) and returns
    /// once the whole group has joined, or fails after `timeout`.
    pub fn join(
        addr: SocketAddr,
        rank: usize,
        world: usize,
        generation: u64,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        Self::join_within(addr, rank, world, generation, timeout, timeout)
    }

    /// [`TcpCollective::join`], giving up on reaching rank 0 after `connect` (an address read from a
    /// stale record fails fast) while the wait for the whole group is still bounded by `timeout`.
    pub fn join_within(
        addr: SocketAddr,
        rank: usize,
        world: usize,
        generation: u64,
        connect: Duration,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if rank == 0 || rank >= world {
            return Err(CollectiveError::Rendezvous(format!(
                "rank {rank} cannot join a group of {world} (rank 0 leads)"
            )));
        }
        let connect_by = Instant::now() + connect.min(timeout);
        let deadline = Instant::now() + timeout;
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < connect_by => {
                    tracing::debug!(%addr, error = %e, "tensor-parallel leader not reachable yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(CollectiveError::Rendezvous(format!(
                        "rank 0 at {addr} not reachable within {:?}: {e}",
                        connect.min(timeout)
                    )))
                }
            }
        };
        let rendezvous = |e: std::io::Error| CollectiveError::Rendezvous(e.to_string());
        configure(&s, timeout).map_err(rendezvous)?;
        s.write_all(&hello(rank, world, generation))
            .map_err(rendezvous)?;
        // The answer comes when the whole group has joined, which may take up to the leader's timeout.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left + Duration::from_secs(1)))
            .map_err(rendezvous)?;
        let reply = read_frame(&mut s).map_err(|e| {
            CollectiveError::Rendezvous(format!("rank 0 at {addr} did not complete the group: {e}"))
        })?;
        match reply.split_first() {
            Some((0, _)) => {}
            Some((_, why)) => {
                return Err(CollectiveError::Rendezvous(format!(
                    "rank 0 refused rank {rank}: {}",
                    String::from_utf8_lossy(why)
                )))
            }
            None => return Err(CollectiveError::Rendezvous("empty reply".into())),
        }
        s.set_read_timeout(Some(timeout)).map_err(rendezvous)?;
        Ok(Self {
            rank,
            world,
            timeout,
            links: vec![Mutex::new(s)],
            failed: Mutex::new(None),
            stats: CollectiveStats::default(),
        })
    }

    /// Bounds every later operation by `timeout` (the rendezvous may allow longer: loading a shard takes
    /// a while).
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, CollectiveError> {
        for (i, l) in self.links.iter().enumerate() {
            let s = l.lock().expect("link lock");
            configure(&s, timeout).map_err(|e| io_error(self.peer(i), timeout, e))?;
        }
        self.timeout = timeout;
        Ok(self)
    }

    fn check(&self) -> Result<(), CollectiveError> {
        match &*self.failed.lock().expect("failed lock") {
            Some(why) => Err(CollectiveError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Marks the group failed and shuts every socket so the peers see it at once.
    fn fail(&self, e: CollectiveError) -> CollectiveError {
        let mut f = self.failed.lock().expect("failed lock");
        if f.is_none() {
            *f = Some(e.to_string());
        }
        for l in &self.links {
            if let Ok(s) = l.lock() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        e
    }

    /// The peer rank behind link `i`.
    fn peer(&self, i: usize) -> usize {
        if self.rank == 0 {
            i + 1
        } else {
            0
        }
    }

    fn send(&self, i: usize, payload: &[u8]) -> Result<(), CollectiveError> {
        let mut s = self.links[i].lock().expect("link lock");
        write_frame(&mut s, payload).map_err(|e| io_error(self.peer(i), self.timeout, e))
    }

    fn recv(&self, i: usize, wait: Option<Duration>) -> Result<Vec<u8>, CollectiveError> {
        let mut s = self.links[i].lock().expect("link lock");
        let peer = self.peer(i);
        if wait != Some(self.timeout) {
            s.set_read_timeout(wait)
                .map_err(|e| io_error(peer, self.timeout, e))?;
        }
        let r = read_frame(&mut s);
        if wait != Some(self.timeout) {
            let _ = s.set_read_timeout(Some(self.timeout));
        }
        r.map_err(|e| io_error(peer, wait.unwrap_or(self.timeout), e))
    }

    /// Runs one operation: refuses on a failed group, records bytes and time, fails the group on error.
    fn op<T>(
        &self,
        f: impl FnOnce(&mut usize, &mut usize) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        self.check()?;
        let t = Instant::now();
        let (mut sent, mut received) = (0, 0);
        let r = f(&mut sent, &mut received);
        self.stats.record(sent, received, t.elapsed());
        r.map_err(|e| self.fail(e))
    }

    /// Rank 0 collects one frame from every other rank, in rank order.
    fn collect(&self, received: &mut usize) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let mut parts = Vec::with_capacity(self.links.len());
        for i in 0..self.links.len() {
            let b = self.recv(i, Some(self.timeout))?;
            *received += b.len() + 4;
            parts.push(b);
        }
        Ok(parts)
    }

    /// Rank 0 sends the same frame to every other rank.
    fn send_all(&self, payload: &[u8], sent: &mut usize) -> Result<(), CollectiveError> {
        for i in 0..self.links.len() {
            self.send(i, payload)?;
            *sent += payload.len() + 4;
        }
        Ok(())
    }
}

fn encode_parts(parts: &[Vec<f32>]) -> Vec<u8> {
    let mut b = (parts.len() as u32).to_le_bytes().to_vec();
    for p in parts {
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(&f32_bytes(p));
    }
    b
}

fn decode_parts(b: &[u8], world: usize) -> Result<Vec<Vec<f32>>, CollectiveError> {
    let bad = || CollectiveError::Protocol {
        peer: 0,
        what: "malformed all-gather result".into(),
    };
    let u32_at = |i: usize| -> Result<usize, CollectiveError> {
        let s = b.get(i..i + 4).ok_or_else(bad)?;
        Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")) as usize)
    };
    let n = u32_at(0)?;
    if n != world {
        return Err(bad());
    }
    let (mut at, mut parts) = (4, Vec::with_capacity(n));
    for _ in 0..n {
        let len = u32_at(at)?;
        at += 4;
        let s = b.get(at..at + len * 4).ok_or_else(bad)?;
        parts.push(bytes_f32(s));
        at += len * 4;
    }
    Ok(parts)
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.op(|sent, received| {
            if self.rank == 0 {
                for (i, part) in self.collect(received)?.into_iter().enumerate() {
                    if part.len() != buf.len() * 4 {
                        return Err(CollectiveError::Protocol {
                            peer: i + 1,
                            what: format!(
                                "all-reduce of {} floats, rank 0 has {}",
                                part.len() / 4,
                                buf.len()
                            ),
                        });
                    }
                    for (a, c) in buf.iter_mut().zip(part.chunks_exact(4)) {
                        *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                self.send_all(&f32_bytes(buf), sent)
            } else {
                let b = f32_bytes(buf);
                self.send(0, &b)?;
                *sent += b.len() + 4;
                let r = self.recv(0, Some(self.timeout))?;
                *received += r.len() + 4;
                if r.len() != buf.len() * 4 {
                    return Err(CollectiveError::Protocol {
                        peer: 0,
                        what: "all-reduce result of the wrong length".into(),
                    });
                }
                for (a, c) in buf.iter_mut().zip(r.chunks_exact(4)) {
                    *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                Ok(())
            }
        })
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError> {
        if self.world == 1 {
            return Ok(vec![local.to_vec()]);
        }
        self.op(|sent, received| {
            if self.rank == 0 {
                let mut parts = vec![local.to_vec()];
                parts.extend(self.collect(received)?.iter().map(|b| bytes_f32(b)));
                self.send_all(&encode_parts(&parts), sent)?;
                Ok(parts)
            } else {
                let b = f32_bytes(local);
                self.send(0, &b)?;
                *sent += b.len() + 4;
                let r = self.recv(0, Some(self.timeout))?;
                *received += r.len() + 4;
                decode_parts(&r, self.world)
            }
        })
    }

    fn gather(&self, local: &[f32]) -> Result<Option<Vec<Vec<f32>>>, CollectiveError> {
        if self.world == 1 {
            return Ok(Some(vec![local.to_vec()]));
        }
        self.op(|sent, received| {
            if self.rank == 0 {
                let mut parts = vec![local.to_vec()];
                parts.extend(self.collect(received)?.iter().map(|b| bytes_f32(b)));
                Ok(Some(parts))
            } else {
                let b = f32_bytes(local);
                self.send(0, &b)?;
                *sent += b.len() + 4;
                Ok(None)
            }
        })
    }

    fn broadcast(
        &self,
        bytes: &mut Vec<u8>,
        wait: Option<Duration>,
    ) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.op(|sent, received| {
            if self.rank == 0 {
                self.send_all(bytes, sent)
            } else {
                *bytes = self.recv(0, wait)?;
                *received += bytes.len() + 4;
                Ok(())
            }
        })
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.op(|sent, received| {
            if self.rank == 0 {
                self.collect(received)?;
                self.send_all(&[], sent)
            } else {
                self.send(0, &[])?;
                *sent += 4;
                self.recv(0, Some(self.timeout))?;
                *received += 4;
                Ok(())
            }
        })
    }

    fn stats(&self) -> &CollectiveStats {
        &self.stats
    }
}

impl Drop for TcpCollective {
    fn drop(&mut self) {
        for l in &self.links {
            if let Ok(s) = l.lock() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn group(world: usize, timeout: Duration) -> Vec<TcpCollective> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let joins: Vec<_> = (1..world)
            .map(|r| {
                std::thread::spawn(move || TcpCollective::join(addr, r, world, 7, timeout).unwrap())
            })
            .collect();
        let mut out = vec![TcpCollective::lead(l, world, 7, timeout).unwrap()];
        out.extend(joins.into_iter().map(|j| j.join().unwrap()));
        out
    }

    /// Runs `f` on every rank at once and returns the results in rank order.
    fn on_all<T: Send + 'static>(
        g: Vec<TcpCollective>,
        f: impl Fn(&TcpCollective) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = g
            .into_iter()
            .map(|c| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || f(&c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
        let out = on_all(group(3, Duration::from_secs(10)), |c| {
            // Values whose sum depends on the order: (1e8 + 1) - 1e8 is 0 in f32, 1e8 + (1 - 1e8) is not.
            let mut v = match c.rank() {
                0 => vec![1e8f32, 1.0, c.rank() as f32],
                1 => vec![1.0, 2.0, 1.0],
                _ => vec![-1e8, 3.0, 2.0],
            };
            c.all_reduce_sum(&mut v).unwrap();
            v
        });
        let want = [(1e8f32 + 1.0) + -1e8, 6.0, 3.0];
        for v in &out {
            assert_eq!(
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn gather_all_gather_broadcast_and_barrier() {
        let out = on_all(group(3, Duration::from_secs(10)), |c| {
            let local: Vec<f32> = (0..=c.rank()).map(|i| (10 * c.rank() + i) as f32).collect();
            let all = c.all_gather(&local).unwrap();
            let g = c.gather(&local).unwrap();
            let mut b = if c.rank() == 0 {
                b"step".to_vec()
            } else {
                Vec::new()
            };
            c.broadcast(&mut b, None).unwrap();
            c.barrier().unwrap();
            (all, g, b, c.stats().snapshot())
        });
        let want = vec![vec![0.0], vec![10.0, 11.0], vec![20.0, 21.0, 22.0]];
        for (r, (all, g, b, stats)) in out.into_iter().enumerate() {
            assert_eq!(all, want);
            assert_eq!(g, (r == 0).then(|| want.clone()));
            assert_eq!(b, b"step");
            assert_eq!(stats.calls, 4);
            assert!(stats.bytes_sent > 0 && stats.bytes_received > 0);
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_within_the_timeout_and_the_group_stays_failed() {
        let mut g = group(2, Duration::from_millis(300));
        let follower = g.pop().unwrap();
        let leader = g.pop().unwrap();
        // Rank 1 is alive but never calls: a timeout.
        let t = Instant::now();
        let e = leader.all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(matches!(e, CollectiveError::Timeout { peer: 1, .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(matches!(
            leader.barrier().unwrap_err(),
            CollectiveError::Failed(_)
        ));
        // The leader's failure shut the sockets: rank 1 sees it at once instead of waiting.
        let t = Instant::now();
        assert!(follower.all_reduce_sum(&mut [1.0]).is_err());
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_peer_that_exits_is_seen_as_gone() {
        let mut g = group(2, Duration::from_secs(30));
        drop(g.pop());
        let t = Instant::now();
        let e = g[0].all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(
            matches!(e, CollectiveError::PeerGone { peer: 1, .. }),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn rendezvous_refuses_strangers_and_times_out_naming_the_missing_ranks() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let wrong = std::thread::spawn(move || {
            TcpCollective::join(addr, 1, 3, 8, Duration::from_secs(5)).unwrap_err()
        });
        let e = TcpCollective::lead(l, 3, 7, Duration::from_millis(500)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("[1, 2]"), "{msg}");
        let refused = wrong.join().unwrap().to_string();
        assert!(refused.contains("generation"), "{refused}");
    }
}
