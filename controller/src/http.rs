//! The small HTTP servers both roles run: metrics and probes on one address,
//! debugging views on another (loopback by default: they name pods and
//! flows).

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A response: status, content type, body.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

/// What a handler answers: a reply now, or one that comes when something
/// happens (a long poll).
pub enum Answer {
    Now(Reply),
    Later(Pin<Box<dyn Future<Output = Reply> + Send>>),
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Self {
        Answer::Now(reply)
    }
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Reply { status: StatusCode::OK, content_type, body }
    }

    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Reply { status, content_type: "text/plain", body: body.into() }
    }

    pub fn not_found() -> Self {
        Reply::text(StatusCode::NOT_FOUND, "not found\n")
    }

    /// 200 `ok` when healthy, else 503 with why.
    pub fn probe(result: Result<&'static str, String>) -> Self {
        match result {
            Ok(word) => Reply::text(StatusCode::OK, format!("{word}\n")),
            Err(why) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        }
    }
}

/// Serve GET requests by path and query (empty when none) until the process ends. Returns the bound
/// address (port 0 picks one).
pub async fn serve<H>(address: SocketAddr, handler: H) -> std::io::Result<SocketAddr>
where
    H: Fn(&str, &str) -> Answer + Send + Sync + 'static,
{
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let handler = Arc::new(handler);
    tokio::spawn(accept(listener, move |request: Request<hyper::body::Incoming>| {
        let handler = handler.clone();
        async move {
            let reply = match handler(request.uri().path(), request.uri().query().unwrap_or_default()) {
                Answer::Now(reply) => reply,
                Answer::Later(reply) => reply.await,
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(reply.status)
                    .header("content-type", reply.content_type)
                    .body(Full::new(Bytes::from(reply.body)))
                    .expect("a valid response"),
            )
        }
    }));
    Ok(bound)
}

async fn accept<S, F>(listener: TcpListener, service: S)
where
    S: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let service = service.clone();
        tokio::spawn(async move {
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(service)).await;
        });
    }
}
