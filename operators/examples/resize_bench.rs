//! What openpi's server-side `resize_with_pad` (Pillow-exact bilinear, `openpi::resize`) costs
//! per camera: the median over ITERS calls on a random RGB image (seed 0), for the camera
//! shapes robots send, single-threaded as the server runs it.
//!
//! cargo run --release -p operators --example resize_bench -- [ITERS]

use std::hint::black_box;
use std::time::Instant;

use operators::openpi::resize::resize_with_pad;
use rand::{Rng, SeedableRng};

/// (input height, input width, output square side).
const CASES: &[(usize, usize, usize)] = &[
    (224, 224, 32),
    (256, 256, 224),
    (480, 640, 224),
    (720, 1280, 224),
];

fn main() -> Result<(), String> {
    let iters = match std::env::args().nth(1) {
        None => 200,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("ITERS must be a positive integer, got `{s}`"))?,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    // openpi::resize runs AVX2 kernels where the CPU has them, portable loops elsewhere.
    #[cfg(target_arch = "x86_64")]
    let kernels = if std::arch::is_x86_feature_detected!("avx2") {
        "AVX2"
    } else {
        "portable"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let kernels = "portable";
    println!("{iters} iterations per shape, median per camera, {kernels} kernels");
    println!("{:>16} {:>6} {:>12}", "input", "size", "median us");
    for &(h, w, size) in CASES {
        let img: Vec<u8> = (0..h * w * 3).map(|_| rng.random()).collect();
        // Warm-up: page in the input and the allocator's pools.
        for _ in 0..iters.div_ceil(10) {
            black_box(resize_with_pad(black_box(&img), h, w, size));
        }
        let mut us: Vec<f64> = (0..iters)
            .map(|_| {
                let t = Instant::now();
                black_box(resize_with_pad(black_box(&img), h, w, size));
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        us.sort_by(f64::total_cmp);
        println!(
            "{:>16} {size:>6} {:>12.1}",
            format!("{h}x{w}"),
            us[iters / 2]
        );
    }
    Ok(())
}
