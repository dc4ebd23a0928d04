//! A tiny HTTP/1.1 server on 127.0.0.1 for the fetcher's tests: real sockets, real bytes,
//! and the misbehaviours a mock cannot fake (a stalled answer, a reset connection, a body
//! far larger than anyone should read). One request per connection (`Connection: close`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub(crate) enum Reply {
    Page {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Headers promising a body, then nothing for a minute.
    HeadersThenStall,
    /// Reads the request, then resets the connection (RST, not FIN).
    Reset,
    /// `len` bytes of body, produced 64 KiB at a time; every byte handed to the socket is
    /// counted in [`TestServer::written`].
    Huge { len: u64 },
}

impl Reply {
    pub(crate) fn html(body: &str) -> Self {
        Reply::Page {
            status: 200,
            headers: vec![("Content-Type".into(), "text/html; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub(crate) fn status(status: u16, body: &str) -> Self {
        Reply::Page {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub(crate) fn redirect(status: u16, location: &str) -> Self {
        Reply::Page {
            status,
            headers: vec![("Location".into(), location.into())],
            body: Vec::new(),
        }
    }
}

type Handler = dyn Fn(&str, SocketAddr) -> Reply + Send + Sync;

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) written: Arc<AtomicU64>,
    /// Every request head received, in order.
    pub(crate) requests: Arc<Mutex<Vec<String>>>,
    accept: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TestServer {
    /// Binds 127.0.0.1:0 and answers each request with `handler(path, own address)`.
    pub(crate) async fn start(
        handler: impl Fn(&str, SocketAddr) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let written = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (w, r) = (written.clone(), requests.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, w, r) = (handler.clone(), w.clone(), r.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, addr, h, w, r).await;
                });
            }
        });
        Self {
            addr,
            written,
            requests,
            accept,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    pub(crate) fn request_heads(&self) -> Vec<String> {
        self.requests.lock().expect("not poisoned").clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    addr: SocketAddr,
    handler: Arc<Handler>,
    written: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    requests.lock().expect("not poisoned").push(head);

    match handler(&path, addr) {
        Reply::Page {
            status,
            headers,
            body,
        } => {
            let mut out = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
            for (k, v) in headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            stream.write_all(out.as_bytes()).await?;
            stream.write_all(&body).await?;
            stream.shutdown().await?;
        }
        Reply::HeadersThenStall => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100\r\n\r\n<html>")
                .await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Reply::Reset => {
            stream.set_zero_linger()?;
            drop(stream);
        }
        Reply::Huge { len } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/html\r\nContent-Length: {len}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            let chunk = vec![b'a'; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                stream.write_all(&chunk[..n]).await?;
                written.fetch_add(n as u64, Ordering::SeqCst);
                left -= n as u64;
            }
        }
    }
    Ok(())
}
