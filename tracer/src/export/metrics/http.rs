//! The HTTP endpoint: `GET /metrics` in the Prometheus text format (HTTP/1.1, one task per
//! connection, graceful shutdown). A client can hold only so much: the request head must arrive
//! whole, and small, within a timeout (also between the requests of a kept-alive connection), a
//! connection lives at most a bounded time whatever it does, and at most so many are open at
//! once (more wait in the kernel's accept queue): a client that connects and sends nothing, or
//! sends an endless header, delays nobody else.
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{CONTENT_TYPE_TEXT, Metrics, MetricsError};

/// How long `serve` waits for in-flight requests once shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What one client may hold of the endpoint; [`Limits::default`] is what the agent uses.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a client may take to send its request head, from when the connection is
    /// accepted or its previous response was sent.
    pub header_read_timeout: Duration,
    /// The longest a request head may be (request line and headers, at least 8 KiB); longer
    /// ones are answered 431 and the connection closed. A scrape's head is a few hundred bytes.
    pub max_head_bytes: usize,
    /// How long a connection may stay open at all, however it behaves (a client that never
    /// reads its response, or trickles its head, included). Prometheus reconnects when a
    /// kept-alive connection is closed.
    pub connection_timeout: Duration,
    /// Connections served at once; more wait to be accepted. Each costs a task and a descriptor.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_head_bytes: 16 << 10,
            connection_timeout: Duration::from_secs(60),
            max_connections: 128,
        }
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish (for a few seconds at most). Binding is left to the caller so that it can report an
/// address already in use.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsError> {
    serve_with(listener, metrics, shutdown, Limits::default()).await
}

/// [`serve`] with other [`Limits`].
pub async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> Result<(), MetricsError> {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let http = builder(&limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                // Never closed while serving; stop as if asked.
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) if is_transient(&err) => {
                    log::warn!("metrics endpoint: accepting a connection: {err}");
                    // Out of descriptors or memory: give the process a moment to recover.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(err) => return Err(MetricsError::Accept(err)),
            },
        };
        let metrics = Arc::clone(&metrics);
        let service = service_fn(move |request: Request<Incoming>| {
            let response = respond(&metrics, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            match tokio::time::timeout(limits.connection_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => log::debug!("metrics endpoint: connection from {peer}: {err}"),
                Err(_) => log::debug!(
                    "metrics endpoint: closed the connection from {peer} after {:?}",
                    limits.connection_timeout
                ),
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            log::debug!("metrics endpoint: gave up waiting for open connections");
        }
    }
    Ok(())
}

/// The HTTP/1.1 settings that enforce `limits` on each connection.
fn builder(limits: &Limits) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // The read buffer bounds a head still incomplete (hyper refuses one under 8 KiB); the
        // response body is queued whole, whatever its size.
        .max_buf_size(limits.max_head_bytes.max(8 << 10))
        .max_header_size(limits.max_head_bytes);
    http
}

/// Accept errors that concern one connection or a passing shortage, not the listener.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::OutOfMemory
    ) || matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

const INDEX_PAGE: &str = "tracer: eBPF TCP connection tracer\n\nMetrics: /metrics\n";

fn respond<B>(metrics: &Metrics, request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != "/metrics" && path != "/" {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path == "/" {
        return text(StatusCode::OK, INDEX_PAGE.into());
    }
    match metrics.render() {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
            response
        }
        Err(err) => {
            log::warn!("{err}");
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n"))
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use tracer_core::model::TcpState::FinWait2;
    use tracer_core::testkit::{active_close_first, loopback, task};
    use tracer_core::tracker::{Tracker, TrackerConfig};

    fn feed(metrics: &Metrics) {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let events = active_close_first(
            1_000_000_000,
            0x10,
            0x20,
            loopback(40000, 8080),
            FinWait2,
            task(42, "curl"),
        );
        for event in &events {
            metrics.event(event);
            tracker.on_event(event, &mut &*metrics);
        }
    }

    fn value(rendered: &str, series: &str) -> Option<f64> {
        rendered.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
    }

    /// A one-shot HTTP/1.1 client: the status code, the headers and the body.
    fn http(addr: std::net::SocketAddr, request: &str) -> (u16, String, String) {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
    }

    #[tokio::test]
    async fn serves_metrics_over_http_and_shuts_down() {
        let metrics = Arc::new(Metrics::new().unwrap());
        feed(&metrics);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::clone(&metrics), async {
            let _ = stopped.await;
        }));

        let client = tokio::task::spawn_blocking(move || {
            (
                get(addr, "/metrics"),
                get(addr, "/"),
                get(addr, "/nope"),
                http(
                    addr,
                    "POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\
                     Connection: close\r\n\r\n",
                ),
            )
        });
        let (metrics_page, index, missing, post) =
            tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .unwrap()
                .unwrap();

        let (status, head, body) = metrics_page;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert_eq!(
            value(
                &body,
                r#"tracer_connections_opened_total{direction="active"}"#
            ),
            Some(1.0),
            "{body}"
        );
        let (status, _, body) = index;
        assert_eq!(status, 200);
        assert!(body.contains("/metrics"), "{body}");
        assert_eq!(missing.0, 404);
        assert_eq!(post.0, 405);
        assert!(post.1.to_ascii_lowercase().contains("allow: get, head"));

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // The listener is closed once serve returns.
        assert!(std::net::TcpStream::connect(addr).is_err());
    }

    const ENDLESS_MAX: usize = 64 << 20;

    /// Starts `serve_with(limits)` on a free loopback port; the sender stops it.
    async fn start(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), MetricsError>>,
    ) {
        let metrics = Arc::new(Metrics::new().unwrap());
        feed(&metrics);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(
            listener,
            metrics,
            async {
                let _ = stopped.await;
            },
            limits,
        ));
        (addr, stop, server)
    }

    /// Reads until the server closes; what it sent. Bounded by a read timeout.
    fn until_closed(stream: &mut std::net::TcpStream) -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
                Err(e) => panic!("waiting for the server to close: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn silent_slow_and_oversized_clients_are_cut_off_and_block_nobody() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            max_head_bytes: 8 << 10,
            connection_timeout: Duration::from_secs(2),
            max_connections: 3,
        };
        let (addr, stop, server) = start(limits).await;
        let client = tokio::task::spawn_blocking(move || {
            // Takes the three slots: silent, trickling, and a head that never ends.
            let mut silent = std::net::TcpStream::connect(addr).unwrap();
            let mut trickle = std::net::TcpStream::connect(addr).unwrap();
            let mut endless = std::net::TcpStream::connect(addr).unwrap();
            let trickler = std::thread::spawn(move || {
                // One byte every 50 ms (each well within the head timeout of a naive
                // per-read timer), for at most 10 s: cut off by the head timeout.
                trickle.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
                for _ in 0..200 {
                    if trickle.write_all(b"X").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                until_closed(&mut trickle)
            });
            let writer = std::thread::spawn(move || {
                let mut sent = endless.write(b"GET /metrics HTTP/1.1\r\nX-Long: ").unwrap();
                let chunk = [b'a'; 16 << 10];
                // At most 64 MiB, more than loopback socket buffers hold: it only all goes
                // out if the server reads it all.
                while sent < ENDLESS_MAX {
                    match endless.write(&chunk) {
                        Ok(n) => sent += n,
                        Err(_) => break,
                    }
                }
                (sent, until_closed(&mut endless))
            });
            // A scrape still answers: it waits for a slot the limits free.
            let scraped = get(addr, "/metrics");
            let silent_got = until_closed(&mut silent);
            (
                scraped,
                silent_got,
                trickler.join().unwrap(),
                writer.join().unwrap(),
            )
        });
        let (scraped, silent_got, trickled_got, (sent, endless_got)) =
            tokio::time::timeout(Duration::from_secs(60), client)
                .await
                .unwrap()
                .unwrap();
        assert_eq!(scraped.0, 200, "{}", scraped.1);
        assert!(
            silent_got.is_empty()
                || String::from_utf8_lossy(&silent_got).starts_with("HTTP/1.1 408"),
            "{silent_got:?}"
        );
        assert!(
            !String::from_utf8_lossy(&trickled_got).contains("200 OK"),
            "{trickled_got:?}"
        );
        // The endless head was refused: 431 and closed, not read to its end.
        assert!(sent < ENDLESS_MAX, "the server read all {sent} bytes");
        let answer = String::from_utf8_lossy(&endless_got);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_once_idle_past_the_head_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, stop, server) = start(limits).await;
        let client = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .unwrap();
            // The response, then nothing more from us: the server closes.
            until_closed(&mut stream)
        });
        let got = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_response_far_larger_than_the_head_limit_goes_out_whole() {
        const BODY: usize = 4 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(|_request: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'm'; BODY]))))
            });
            builder(&Limits::default())
                .serve_connection(TokioIo::new(stream), service)
                .await
        });
        let client = tokio::task::spawn_blocking(move || get(addr, "/metrics"));
        let (status, head, body) = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200, "{head}");
        assert_eq!(body.len(), BODY);
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
