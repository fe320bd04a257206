//! The floor of the load benchmark: the least CPU a tokio proxy can spend per request.
//!
//! Not a proxy anyone should run: it parses nothing, decides nothing and assumes
//! that one read is one whole request and one read from the backend is one whole
//! response, which holds only for wrk's small GETs and the benchmark's 6-byte
//! answers. Each client connection gets its own backend connection (backends in
//! turn) and bytes are copied back and forth on one current-thread runtime, as
//! Fulcrum's worker does. What is left between this row and Fulcrum's in
//! `benches/load.sh` is everything Fulcrum does per request: HTTP framing, the
//! Wasm decision, pooling, timeouts, accounting (see docs/BENCHMARKS.md).
//!
//! Usage: `floor_proxy LISTEN BACKEND [BACKEND...]`, e.g.
//! `floor_proxy 127.0.0.1:18183 127.0.0.1:19101 127.0.0.1:19102`.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| {
        a.parse::<SocketAddr>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{a}: {e}")))
    });
    let usage = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "usage: floor_proxy LISTEN BACKEND...");
    let listen = args.next().ok_or_else(usage)??;
    let backends = args.collect::<Result<Vec<_>, _>>()?;
    if backends.is_empty() {
        return Err(usage());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(listen).await?;
            for backend in backends.iter().cycle() {
                let (client, _) = listener.accept().await?;
                let backend = *backend;
                tokio::spawn(async move {
                    // A failed connection only ends that client's connection, as in a proxy.
                    let _ = relay(client, backend).await;
                });
            }
            Ok(())
        })
}

async fn relay(mut client: TcpStream, backend: SocketAddr) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(backend).await?;
    upstream.set_nodelay(true)?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let request = client.read(&mut buf).await?;
        if request == 0 {
            return Ok(());
        }
        upstream.write_all(&buf[..request]).await?;
        let response = upstream.read(&mut buf).await?;
        if response == 0 {
            return Ok(());
        }
        client.write_all(&buf[..response]).await?;
    }
}
