//! The HTTP endpoint: `GET /metrics` in the Prometheus text format (HTTP/1.1, one connection
//! at a time per task, header read timeout, graceful shutdown).
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

use super::{CONTENT_TYPE_TEXT, Metrics, MetricsError};

/// How long `serve` waits for in-flight requests once shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish (for a few seconds at most). Binding is left to the caller so that it can report an
/// address already in use.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsError> {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
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
            if let Err(err) = connection.await {
                log::debug!("metrics endpoint: connection from {peer}: {err}");
            }
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
}
