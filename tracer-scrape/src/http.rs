//! `GET` over plain HTTP/1.1 to a loopback address, for a page the caller checks itself.
//!
//! Written here rather than taken from an HTTP client crate: it reads to the end of the
//! stream, so the agent's server always closes first and each scrape leaves its TIME_WAIT
//! socket on the server's side, which the TIME_WAIT tests account for. A client that closes
//! as soon as it has the body races the server's FIN and leaves some on either side, or both.
use std::io::{self, ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The largest response read; a metrics page is far smaller, even with a thousand peers.
const RESPONSE_LIMIT: u64 = 64 << 20;
/// The most chunks a chunked body may have.
const MAX_CHUNKS: usize = 100_000;

/// An HTTP response, whatever its status.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from `addr` with `Connection: close`, each socket operation bounded by
/// `timeout`. Any status is returned, not turned into an error, and redirects are not
/// followed: the callers check what the server answered.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    // Test and bench traffic stays on this machine.
    if !addr.ip().is_loopback() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("{addr} is not a loopback address"),
        ));
    }
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // One write: `write!` on an unbuffered stream sends each piece of the format on its own.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tracer-scrape\r\nAccept: \
         text/plain\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.take(RESPONSE_LIMIT).read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut status_fields = status_line.split_whitespace();
    let status = match (status_fields.next(), status_fields.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| bad("bad HTTP status line"))?;
    let headers: Vec<(String, String)> = lines
        .map(|l| l.split_once(':').ok_or_else(|| bad("bad HTTP header line")))
        .map(|kv| kv.map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
        .collect::<io::Result<_>>()?;
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    } else if let Some((_, length)) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        let length: usize = length.parse().map_err(|_| bad("bad Content-Length"))?;
        if body.len() != length {
            return Err(bad("the body is not Content-Length long"));
        }
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..MAX_CHUNKS {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size..)?.strip_prefix(b"\r\n")?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, BufReader};
    use std::net::TcpListener;
    use std::thread;

    /// Serves one connection with `response` and returns the request head it received.
    fn serve_once(response: &'static [u8]) -> (SocketAddr, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                head.push_str(&line);
            }
            reader.get_mut().write_all(response).unwrap();
            head
        });
        (addr, handle)
    }

    #[test]
    fn reads_status_headers_and_a_chunked_body() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
        );
        let response = get(addr, "/metrics", Duration::from_secs(10)).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; version=0.0.4")
        );
        assert_eq!(response.body, "hello, world");
        let head = server.join().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /metrics http/1.1\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(head.contains("accept: text/plain\r\n"), "{head}");
    }

    #[test]
    fn an_error_status_is_a_response_not_an_error() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
        );
        let response = get(addr, "/nothing", Duration::from_secs(10)).unwrap();
        assert_eq!(response.status, 404);
        assert_eq!(response.body, "not found");
        server.join().unwrap();
    }

    #[test]
    fn malformed_responses_are_errors() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"[..],
            b"SSH-2.0-x\r\n\r\n",
            b"HTTP/1.1 two hundred\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        ] {
            let error = parse_response(raw).expect_err(&String::from_utf8_lossy(raw));
            assert_eq!(error.kind(), ErrorKind::InvalidData);
        }
    }

    #[test]
    fn only_loopback() {
        let addr: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let error = get(addr, "/", Duration::from_secs(1)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}
