//! Tensor parallelism: a model sharded Megatron-style over N ranks that run one forward together.
//!
//! **Sharding** ([`ShardPlan`]). Per decoder layer, rank r holds the query heads and KV heads of its
//! slice (q/k/v split by output rows, biases with them: no communication), the matching input columns of
//! the attention output projection, a slice of the FFN's intermediate features (gate/up split by output
//! rows, down by input columns), and a slice of the LM head's vocabulary rows. Embeddings and norms are
//! replicated. The partial outputs of `o` and `down` are summed with one all-reduce each (two per layer);
//! the head's slices are gathered on rank 0, which alone returns logits. A degree must divide both the
//! query and the KV head counts (grouped-query attention: KV heads are not replicated) and the attention
//! output's input split must fall on its quantization blocks; otherwise loading fails with the numbers and
//! the degrees that would work. The FFN split is cut at block boundaries and may be uneven (Qwen2.5-1.5B's
//! 8960 features are 35 blocks of 256: 18 and 17 at degree 2). Each rank reads only its slice of every
//! split tensor from the file.
//!
//! **Determinism.** Each rank's arithmetic is the engine's batch-invariant kernels on its slice, and the
//! collectives add in rank order, so a TP run repeats bit for bit and a row's logits do not depend on
//! which rows share the step (batched verification stays exactly lossless). TP=N differs from TP=1 by
//! float rounding only (partial sums are added in another order).
//!
//! **Driving the group.** Rank 0 leads: its [`Model`] is used like any other (the speculation loop, the
//! target service), and each forward first broadcasts the step (per sequence: its cache's identity and
//! length, which may roll the followers' caches back after rejected drafts, the tokens fed and which
//! logits are wanted; plus the caches dropped since the last step) so the followers ([`follow`]) run the
//! same forward on their shards against caches they keep in step. A failure anywhere (a peer gone, a
//! timeout, a desynchronised cache) fails the group: every later forward is an error, never a hang.
//!
//! Backends: [`tcp::TcpCollective`] (CPU, between threads or processes). Ranks in one process
//! ([`load_gguf_local`]) each get their own thread pool.

pub mod collective;
pub mod tcp;

use std::collections::HashMap;
use std::net::TcpListener;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use collective::{Collective, CollectiveError, CollectiveStats, StatsSnapshot};
pub use tcp::TcpCollective;

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::kv::{DropList, KvCache};
use crate::load::LoadedModel;
use crate::model::{LogitsWanted, Model, SeqInput};

/// What one rank holds of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub rank: usize,
    pub world: usize,
    /// Query heads of this rank.
    pub heads: Range<usize>,
    /// KV heads of this rank.
    pub kv_heads: Range<usize>,
    /// FFN intermediate features of this rank.
    pub ffn: Range<usize>,
    /// LM head rows (token ids) of this rank.
    pub vocab: Range<usize>,
}

fn even(n: usize, rank: usize, world: usize) -> Range<usize> {
    rank * n / world..(rank + 1) * n / world
}

impl ShardPlan {
    /// The plan for `rank` of `world`. `o_block` and `down_block` are the largest quantization block
    /// sizes of the attention output and FFN down projections over all layers (their input columns are
    /// split).
    pub fn new(
        cfg: &ModelConfig,
        rank: usize,
        world: usize,
        o_block: usize,
        down_block: usize,
    ) -> Result<Self, EngineError> {
        if world == 0 || rank >= world {
            return Err(EngineError::InvalidRequest(format!(
                "tensor-parallel rank {rank} of world size {world}: need world >= 1 and rank < world"
            )));
        }
        if let Err(why) = Self::degree_fits(cfg, world, o_block, down_block) {
            let ok = Self::valid_degrees(cfg, o_block, down_block, 16);
            return Err(EngineError::InvalidRequest(format!(
                "tensor-parallel degree {world} does not fit this model: {why}; degrees that do: {ok:?}"
            )));
        }
        let blocks = cfg.ffn / down_block;
        let b = even(blocks, rank, world);
        Ok(Self {
            rank,
            world,
            heads: even(cfg.heads, rank, world),
            kv_heads: even(cfg.kv_heads, rank, world),
            ffn: b.start * down_block..b.end * down_block,
            vocab: even(cfg.vocab, rank, world),
        })
    }

    fn degree_fits(
        cfg: &ModelConfig,
        world: usize,
        o_block: usize,
        down_block: usize,
    ) -> Result<(), String> {
        if !cfg.heads.is_multiple_of(world) || !cfg.kv_heads.is_multiple_of(world) {
            return Err(format!(
                "it must divide both the {} query heads and the {} KV heads",
                cfg.heads, cfg.kv_heads
            ));
        }
        let local_q = cfg.heads / world * cfg.head_dim;
        if !local_q.is_multiple_of(o_block) {
            return Err(format!(
                "the attention output projection would be split at {local_q} input columns, not a \
                 multiple of its quantization block of {o_block}"
            ));
        }
        if cfg.ffn / down_block < world {
            return Err(format!(
                "the FFN's {} features are only {} blocks of {down_block}",
                cfg.ffn,
                cfg.ffn / down_block
            ));
        }
        Ok(())
    }

    /// The degrees up to `max` this model can be split into.
    pub fn valid_degrees(
        cfg: &ModelConfig,
        o_block: usize,
        down_block: usize,
        max: usize,
    ) -> Vec<usize> {
        (1..=max)
            .filter(|&w| Self::degree_fits(cfg, w, o_block, down_block).is_ok())
            .collect()
    }

    /// This rank's query columns (rows of q, input columns of o).
    pub fn q_cols(&self, head_dim: usize) -> Range<usize> {
        self.heads.start * head_dim..self.heads.end * head_dim
    }

    /// This rank's key/value columns (rows of k and v).
    pub fn kv_cols(&self, head_dim: usize) -> Range<usize> {
        self.kv_heads.start * head_dim..self.kv_heads.end * head_dim
    }

    /// The config this rank's forward runs with: its head and FFN counts, the full vocabulary.
    pub fn local_config(&self, cfg: &ModelConfig) -> ModelConfig {
        ModelConfig {
            heads: self.heads.len(),
            kv_heads: self.kv_heads.len(),
            ffn: self.ffn.len(),
            ..cfg.clone()
        }
    }
}

/// Rank 0's part: who it must tell what, and the ranks it started itself.
#[derive(Debug)]
struct Leader {
    /// Caches dropped since the last step (their identities), filled by `KvCache`'s drop.
    dropped: Arc<DropList>,
    /// One step at a time through the group.
    step: Mutex<()>,
    /// Follower ranks running as threads of this process, joined when the leader goes.
    local_ranks: Mutex<Vec<JoinHandle<Result<(), EngineError>>>>,
}

/// One rank's membership of a group, attached to its [`Model`].
#[derive(Debug)]
pub struct TpRank {
    plan: ShardPlan,
    comm: Box<dyn Collective>,
    leader: Option<Leader>,
    /// This rank's threads, when several ranks share a process.
    pool: Option<rayon::ThreadPool>,
}

impl TpRank {
    /// Joins `comm`'s group with the shard `plan` (its rank and world must agree). `pool`: the threads
    /// this rank's forward runs on (`None`: the caller's).
    pub fn new(
        plan: ShardPlan,
        comm: Box<dyn Collective>,
        pool: Option<rayon::ThreadPool>,
    ) -> Result<Self, EngineError> {
        if comm.rank() != plan.rank || comm.world() != plan.world {
            return Err(EngineError::Internal(format!(
                "shard plan is rank {} of {}, the collective rank {} of {}",
                plan.rank,
                plan.world,
                comm.rank(),
                comm.world()
            )));
        }
        let leader = (plan.rank == 0).then(|| Leader {
            dropped: Arc::new(DropList::default()),
            step: Mutex::new(()),
            local_ranks: Mutex::new(Vec::new()),
        });
        Ok(Self {
            plan,
            comm,
            leader,
            pool,
        })
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    pub fn is_leader(&self) -> bool {
        self.leader.is_some()
    }

    /// Bytes and time this rank has spent in collectives.
    pub fn stats(&self) -> StatsSnapshot {
        self.comm.stats().snapshot()
    }

    pub(crate) fn comm(&self) -> &dyn Collective {
        self.comm.as_ref()
    }

    /// The drop list new caches of the leader report to (`None` on followers).
    pub(crate) fn drop_list(&self) -> Option<Arc<DropList>> {
        self.leader.as_ref().map(|l| Arc::clone(&l.dropped))
    }

    fn install<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Rank 0: tells the followers about this step, then runs its own shard of it.
    pub(crate) fn lead(
        &self,
        model: &Model,
        batch: &mut [SeqInput<'_>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let leader = self.leader.as_ref().ok_or_else(|| {
            EngineError::Internal("a follower rank's model is driven by its leader".into())
        })?;
        let _step = leader.step.lock().expect("step lock");
        model.validate(batch)?;
        let dropped = std::mem::take(&mut *leader.dropped.0.lock().expect("drop list"));
        let mut msg = encode_step(model.config().layers, &dropped, batch);
        self.install(|| {
            self.comm.broadcast(&mut msg, None)?;
            model.forward_local(batch)
        })
    }
}

impl Drop for TpRank {
    fn drop(&mut self) {
        if let Some(l) = &self.leader {
            let mut bye = vec![OP_SHUTDOWN];
            if let Err(e) = self.comm.broadcast(&mut bye, None) {
                tracing::debug!(error = %e, "tensor-parallel group already failed at shutdown");
            }
            for h in l.local_ranks.lock().expect("ranks lock").drain(..) {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "a tensor-parallel rank ended with an error")
                    }
                    Err(_) => tracing::error!("a tensor-parallel rank panicked"),
                }
            }
        }
    }
}

const OP_SHUTDOWN: u8 = 0;
const OP_STEP: u8 = 1;

/// One sequence of a step, as the followers get it.
#[derive(Debug, PartialEq)]
struct StepSeq {
    cache: u64,
    /// The cache's length before this step (the followers roll theirs back to it).
    start: usize,
    tokens: Vec<u32>,
    wanted: LogitsWanted,
}

#[derive(Debug, PartialEq)]
enum Step {
    Shutdown,
    Run {
        layers: usize,
        dropped: Vec<u64>,
        seqs: Vec<StepSeq>,
    },
}

fn encode_step(layers: usize, dropped: &[u64], batch: &[SeqInput<'_>]) -> Vec<u8> {
    let mut b = vec![OP_STEP];
    let u32le = |b: &mut Vec<u8>, v: usize| b.extend_from_slice(&(v as u32).to_le_bytes());
    u32le(&mut b, layers);
    u32le(&mut b, dropped.len());
    for id in dropped {
        b.extend_from_slice(&id.to_le_bytes());
    }
    u32le(&mut b, batch.len());
    for s in batch {
        b.extend_from_slice(&s.cache.id().to_le_bytes());
        u32le(&mut b, s.cache.len());
        let (tag, n) = match s.wanted {
            LogitsWanted::None => (0u8, 0),
            LogitsWanted::Last => (1, 0),
            LogitsWanted::All => (2, 0),
            LogitsWanted::Tail(n) => (3, n),
        };
        b.push(tag);
        u32le(&mut b, n);
        u32le(&mut b, s.tokens.len());
        for t in s.tokens {
            b.extend_from_slice(&t.to_le_bytes());
        }
    }
    b
}

fn decode_step(b: &[u8]) -> Result<Step, EngineError> {
    let bad = || EngineError::Internal("malformed tensor-parallel step message".into());
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], EngineError> {
        let s = b.get(at..at + n).ok_or_else(bad)?;
        at += n;
        Ok(s)
    };
    let op = take(1)?[0];
    if op == OP_SHUTDOWN {
        return Ok(Step::Shutdown);
    }
    if op != OP_STEP {
        return Err(bad());
    }
    macro_rules! u32v {
        () => {
            u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize
        };
    }
    macro_rules! u64v {
        () => {
            u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"))
        };
    }
    let layers = u32v!();
    let nd = u32v!();
    let mut dropped = Vec::with_capacity(nd.min(1 << 16));
    for _ in 0..nd {
        dropped.push(u64v!());
    }
    let ns = u32v!();
    let mut seqs = Vec::with_capacity(ns.min(1 << 12));
    for _ in 0..ns {
        let cache = u64v!();
        let start = u32v!();
        let tag = take(1)?[0];
        let n = u32v!();
        let wanted = match tag {
            0 => LogitsWanted::None,
            1 => LogitsWanted::Last,
            2 => LogitsWanted::All,
            3 => LogitsWanted::Tail(n),
            _ => return Err(bad()),
        };
        let nt = u32v!();
        let tokens = take(nt * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        seqs.push(StepSeq {
            cache,
            start,
            tokens,
            wanted,
        });
    }
    Ok(Step::Run {
        layers,
        dropped,
        seqs,
    })
}

/// A follower rank's loop: runs every step rank 0 broadcasts on `model` (this rank's shard) until rank 0
/// shuts the group down (`Ok`) or fails or leaves (`Err`). Keeps one cache per leader cache.
pub fn follow(model: &Model) -> Result<(), EngineError> {
    let tp = model
        .tp()
        .ok_or_else(|| EngineError::Internal("follow() needs a tensor-parallel model".into()))?;
    if tp.is_leader() {
        return Err(EngineError::Internal(
            "rank 0 leads; it does not follow".into(),
        ));
    }
    let rank = tp.plan.rank;
    let mut caches: HashMap<u64, KvCache> = HashMap::new();
    let mut models: HashMap<usize, Model> = HashMap::new();
    let r = tp.install(|| loop {
        let mut msg = Vec::new();
        tp.comm.broadcast(&mut msg, None)?;
        let (layers, dropped, seqs) = match decode_step(&msg)? {
            Step::Shutdown => return Ok(()),
            Step::Run {
                layers,
                dropped,
                seqs,
            } => (layers, dropped, seqs),
        };
        for id in dropped {
            caches.remove(&id);
        }
        let m = match models.entry(layers) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(model.truncated(layers)?),
        };
        let mut taken = Vec::with_capacity(seqs.len());
        for s in &seqs {
            let mut c = caches.remove(&s.cache).unwrap_or_else(|| m.new_cache());
            if c.layers() != layers || c.len() < s.start {
                return Err(EngineError::Internal(format!(
                    "tensor-parallel rank {rank} lost step with cache {}: it holds {} positions of a \
                     {}-layer model, rank 0 says {} of {layers}",
                    s.cache,
                    c.len(),
                    c.layers(),
                    s.start
                )));
            }
            c.truncate(s.start);
            taken.push(c);
        }
        let mut batch: Vec<SeqInput<'_>> = taken
            .iter_mut()
            .zip(&seqs)
            .map(|(cache, s)| SeqInput {
                cache,
                tokens: &s.tokens,
                wanted: s.wanted,
            })
            .collect();
        let out = m.forward_local(&mut batch);
        drop(batch);
        for (c, s) in taken.into_iter().zip(&seqs) {
            caches.insert(s.cache, c);
        }
        out?;
    });
    if let Err(e) = &r {
        tracing::warn!(rank, error = %e, "tensor-parallel rank stops");
    }
    r
}

/// Options for a group whose ranks are threads of this process.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Threads per rank.
    pub threads_per_rank: usize,
    /// Bound on every collective.
    pub timeout: Duration,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            threads_per_rank: 1,
            timeout: Duration::from_secs(60),
        }
    }
}

fn pool(threads: usize, rank: usize) -> Result<rayon::ThreadPool, EngineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("tp{rank}-{i}"))
        .build()
        .map_err(|e| EngineError::Internal(format!("thread pool for rank {rank}: {e}")))
}

/// Loads `path` as a group of `world` ranks in this process (threads over loopback TCP) and returns rank
/// 0's model, which drives the others; they stop when it is dropped. `world == 1` is a plain model.
pub fn load_gguf_local(
    path: &Path,
    world: usize,
    opts: &LocalOptions,
) -> Result<LoadedModel, EngineError> {
    if world <= 1 {
        return crate::load::load_gguf(path);
    }
    // Check the degree before starting anything.
    crate::load::shard_plan_for(path, 0, world)?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr().map(|a| (l, a)))
        .map_err(|e| EngineError::Internal(format!("tensor-parallel listener: {e}")));
    let (listener, addr) = listener?;
    let generation = std::process::id() as u64;
    // Loading a shard takes a while; the rendezvous waits for it, the steps use `opts.timeout`.
    let rendezvous = opts.timeout.max(Duration::from_secs(300));
    let mut handles = Vec::new();
    for rank in 1..world {
        let (path, opts) = (path.to_path_buf(), opts.clone());
        let h = std::thread::Builder::new()
            .name(format!("tp-rank-{rank}"))
            .spawn(move || -> Result<(), EngineError> {
                let pool = pool(opts.threads_per_rank, rank)?;
                let loaded = pool.install(|| crate::load::load_gguf_shard(&path, rank, world))?;
                let comm = TcpCollective::join(addr, rank, world, generation, rendezvous)?
                    .with_timeout(opts.timeout)?;
                let plan = loaded.1;
                let model =
                    loaded
                        .0
                        .model
                        .with_tp(TpRank::new(plan, Box::new(comm), Some(pool))?)?;
                follow(&model)
            })
            .map_err(|e| EngineError::Internal(format!("starting rank {rank}: {e}")))?;
        handles.push(h);
    }
    let pool0 = pool(opts.threads_per_rank, 0)?;
    let (loaded, plan) = pool0.install(|| crate::load::load_gguf_shard(path, 0, world))?;
    let comm = TcpCollective::lead(listener, world, generation, rendezvous).map_err(|e| {
        // A rank that failed to load says why better than the rendezvous timeout does.
        for h in handles.drain(..) {
            if h.is_finished() {
                if let Ok(Err(err)) = h.join() {
                    return EngineError::Internal(format!("tensor-parallel rank failed: {err}"));
                }
            }
        }
        EngineError::from(e)
    })?;
    let comm = comm.with_timeout(opts.timeout)?;
    let tp = TpRank::new(plan, Box::new(comm), Some(pool0))?;
    tp.leader
        .as_ref()
        .expect("rank 0 leads")
        .local_ranks
        .lock()
        .expect("ranks lock")
        .extend(handles);
    Ok(LoadedModel {
        model: loaded.model.with_tp(tp)?,
        ..loaded
    })
}

/// One rank of a group whose ranks are separate processes (one per GPU or per pod, Kubernetes style):
/// loads this rank's shard of `path`, then joins the group through `connect` (rank 0 leads, the others
/// join; the rendezvous is the caller's, through the coordination store). Rank 0's model drives the
/// group like any model; the others' is for [`follow`]. The rank's forward runs on the caller's threads.
pub fn load_gguf_rank(
    path: &Path,
    rank: usize,
    world: usize,
    connect: impl FnOnce() -> Result<Box<dyn Collective>, EngineError>,
) -> Result<LoadedModel, EngineError> {
    if rank >= world {
        return Err(EngineError::Internal(format!(
            "rank {rank} is not in a group of {world} (ranks are 0..{world})"
        )));
    }
    let (loaded, plan) = crate::load::load_gguf_shard(path, rank, world)?;
    let tp = TpRank::new(plan, connect()?, None)?;
    Ok(LoadedModel {
        model: loaded.model.with_tp(tp)?,
        ..loaded
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{Family, RopeStyle};

    fn cfg(heads: usize, kv: usize, hd: usize, ffn: usize, vocab: usize) -> ModelConfig {
        ModelConfig {
            family: Family::Qwen2,
            hidden: heads * hd,
            layers: 2,
            ffn,
            heads,
            kv_heads: kv,
            head_dim: hd,
            vocab,
            context: 128,
            rms_eps: 1e-6,
            rope_theta: 1e4,
            rope: RopeStyle::Halves,
        }
    }

    #[test]
    fn qwen_1_5b_splits_in_two_with_an_uneven_ffn_cut_at_blocks() {
        let c = cfg(12, 2, 128, 8960, 151936);
        let p0 = ShardPlan::new(&c, 0, 2, 256, 256).unwrap();
        let p1 = ShardPlan::new(&c, 1, 2, 256, 256).unwrap();
        assert_eq!((p0.heads.clone(), p1.heads.clone()), (0..6, 6..12));
        assert_eq!((p0.kv_heads.clone(), p1.kv_heads.clone()), (0..1, 1..2));
        assert_eq!((p0.ffn.clone(), p1.ffn.clone()), (0..4352, 4352..8960));
        assert_eq!(p0.vocab.end, p1.vocab.start);
        assert_eq!(p1.vocab.end, 151936);
        assert_eq!(ShardPlan::valid_degrees(&c, 256, 256, 16), vec![1, 2]);
    }

    #[test]
    fn a_degree_that_does_not_divide_the_heads_is_refused_naming_the_numbers() {
        // SmolLM2-135M: 9 query heads, 3 KV heads.
        let c = cfg(9, 3, 64, 1536, 49152);
        let e = ShardPlan::new(&c, 0, 2, 32, 32).unwrap_err().to_string();
        assert!(
            e.contains("degree 2") && e.contains("9 query heads") && e.contains("3 KV heads"),
            "{e}"
        );
        assert!(e.contains("[1, 3]"), "{e}");
        assert!(ShardPlan::new(&c, 2, 3, 32, 32).is_ok());
        // With 256-value blocks on o, 3 heads of 64 per rank (192 columns) do not fall on a block.
        let e = ShardPlan::new(&c, 0, 3, 256, 32).unwrap_err().to_string();
        assert!(e.contains("192") && e.contains("256"), "{e}");
        assert!(ShardPlan::new(&c, 3, 3, 32, 32).is_err());
    }

    #[test]
    fn step_messages_round_trip() {
        let mut a = KvCache::new(2, 1, 4);
        let mut b = KvCache::new(2, 1, 4);
        let batch = [
            SeqInput {
                cache: &mut a,
                tokens: &[1, 2, 3],
                wanted: LogitsWanted::Tail(2),
            },
            SeqInput {
                cache: &mut b,
                tokens: &[],
                wanted: LogitsWanted::None,
            },
        ];
        let msg = encode_step(2, &[9, 10], &batch);
        let (ia, ib) = (batch[0].cache.id(), batch[1].cache.id());
        assert_ne!(ia, ib);
        assert_eq!(
            decode_step(&msg).unwrap(),
            Step::Run {
                layers: 2,
                dropped: vec![9, 10],
                seqs: vec![
                    StepSeq {
                        cache: ia,
                        start: 0,
                        tokens: vec![1, 2, 3],
                        wanted: LogitsWanted::Tail(2)
                    },
                    StepSeq {
                        cache: ib,
                        start: 0,
                        tokens: vec![],
                        wanted: LogitsWanted::None
                    },
                ],
            }
        );
        assert!(decode_step(&msg[..msg.len() - 1]).is_err());
        assert_eq!(decode_step(&[OP_SHUTDOWN]).unwrap(), Step::Shutdown);
    }
}
