//! Bodies stream through the balancer both ways: 100 MiB up and down while
//! the balancer's resident memory stays flat.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const SIZE: u64 = 100 << 20;
const CHUNK: usize = 64 << 10;

/// Samples the process's RSS every 10 ms until stopped; returns the peak.
fn sample_peak_rss(fulcrum: &Fulcrum, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let pid = fulcrum.pid();
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_of(pid));
            std::thread::sleep(Duration::from_millis(10));
        }
        peak
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_up_and_down_with_flat_memory() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\n[pools.web]\nbackends = {}\n",
        backends_toml(&backends, &[])
    );
    let fulcrum = Fulcrum::start(&text, &[]);
    // Warm up (plugin instances, connection pools), then take the baseline.
    for _ in 0..20 {
        get(fulcrum.addr, "/").await.expect("warm-up");
    }
    let baseline = fulcrum.rss();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak_rss(&fulcrum, stop.clone());

    // Download: the backend streams 100 MiB.
    let downloaded = tokio::time::timeout(Duration::from_secs(60), async {
        let mut sender = http1_sender(fulcrum.addr).await.expect("connect");
        let request = http::Request::get(format!("/bytes/{SIZE}"))
            .header("host", "test.local")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let mut body = sender.send_request(request).await.expect("response").into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.expect("frame").data_ref() {
                total += data.len() as u64;
            }
        }
        total
    })
    .await
    .expect("download within 60 s");
    assert_eq!(downloaded, SIZE);

    // Upload: the client streams 100 MiB; the backend answers the count.
    let uploaded = tokio::time::timeout(Duration::from_secs(60), async {
        let mut sender = http1_sender(fulcrum.addr).await.expect("connect");
        let chunk = Bytes::from(vec![b'u'; CHUNK]);
        let frames =
            (0..SIZE / CHUNK as u64).map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone())));
        let request = http::Request::post("/upload")
            .header("host", "test.local")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let body = response.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body)
            .trim()
            .parse::<u64>()
            .expect("a byte count")
    })
    .await
    .expect("upload within 60 s");
    assert_eq!(uploaded, SIZE);
    assert_eq!(backends[0].stats.body_bytes.load(Ordering::Relaxed), SIZE);

    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    let growth = peak.saturating_sub(baseline);
    assert!(
        growth < 32 << 20,
        "memory grew by {} MiB moving 2 × 100 MiB (baseline {} MiB, peak {} MiB)",
        growth >> 20,
        baseline >> 20,
        peak >> 20
    );
}
