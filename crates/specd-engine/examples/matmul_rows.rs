//! Prints, per weight format and shape of a model, the time of one matmul over m = 1, 2, 4, 8 activation
//! rows and the multiply rate of the extra rows: where a verify step's extra rows go.
//! Usage: matmul_rows MODEL.gguf
use std::time::Instant;

use specd_engine::load_gguf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: matmul_rows MODEL.gguf")?;
    let loaded = load_gguf(std::path::Path::new(&path))?;
    let w = loaded.model.weights();
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    let named = w.layers[0].matrices().into_iter().chain([("head", head)]);
    println!(
        "weight  format  n x k          m=1 ms   m=2 x   m=4 x   m=8 x  GMAC/s per extra row (m=8)"
    );
    for (name, q) in named {
        let k = q.cols();
        let mut times = Vec::new();
        for m in [1usize, 2, 4, 8] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let reps = if name == "head" { 5 } else { 100 };
            q.matmul(&x, m);
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(q.matmul(&x, m));
            }
            times.push(t.elapsed().as_secs_f64() * 1000.0 / reps as f64);
        }
        println!(
            "{name:<7} {:<7} {:>6} x {:<6} {:>7.3} {:>7.2} {:>7.2} {:>7.2}  {:>7.0}",
            q.dtype_name(),
            q.rows(),
            k,
            times[0],
            times[1] / times[0],
            times[2] / times[0],
            times[3] / times[0],
            (7 * q.rows() * k) as f64 / ((times[3] - times[0]) * 1e6)
        );
    }
    Ok(())
}
