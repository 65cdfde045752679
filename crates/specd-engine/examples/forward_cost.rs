//! Prints the cost of one forward over m new positions (m = 1..=9) after a 128-token context: the verify
//! cost curve the speculation-length controller learns online, as the median and the minimum of REPS runs
//! (default 7). Usage: [ROWS=m] [REPS=n] forward_cost MODEL.gguf [THREADS]
use std::time::Instant;

use specd_engine::{load_gguf, LogitsWanted};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: forward_cost MODEL.gguf [THREADS]")?;
    if let Some(t) = args.next() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.parse()?)
            .build_global()?;
    }
    let loaded = load_gguf(std::path::Path::new(&path))?;
    let model = &loaded.model;
    let ctx: Vec<u32> = (0..128u32).map(|i| 1000 + i * 7).collect();
    let mut cache = model.new_cache();
    model.forward(&mut cache, &ctx, LogitsWanted::None)?;
    let base = cache.len();
    let mut t1 = 0.0;
    println!("rows  ms/forward  x one-row  min ms  x one-row min");
    let mut m1 = 0.0;
    let only: Option<usize> = std::env::var("ROWS").ok().and_then(|v| v.parse().ok());
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    for m in 1..=9usize {
        if only.is_some_and(|o| o != m) {
            continue;
        }
        let toks: Vec<u32> = (0..m as u32).map(|i| 2000 + i).collect();
        let mut times = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            model.forward(&mut cache, &toks, LogitsWanted::All)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            cache.truncate(base);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let med = times[times.len() / 2];
        let min = times[0];
        if m == 1 {
            t1 = med;
            m1 = min;
        }
        println!(
            "{m:>4}  {med:>10.2}  {:>8.2}  {min:>6.2}  {:>8.2}",
            med / t1,
            min / m1
        );
    }
    Ok(())
}
