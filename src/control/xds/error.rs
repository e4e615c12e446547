//! Why an xDS session ended, and the one classification of it the metrics use.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("{setting} {address} is not a usable endpoint: {source}")]
    Endpoint {
        setting: &'static str,
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("reading the token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a valid gRPC header value")]
    Header { what: &'static str },
    #[error("opening the ADS stream: {0}")]
    Open(#[source] tonic::Status),
    #[error("reading from the ADS stream: {0}")]
    Stream(#[source] tonic::Status),
    #[error("the ADS stream's request side closed")]
    RequestClosed,
    #[error("stream closed by istiod")]
    ClosedByServer,
}

impl XdsError {
    /// The `reason` label of `istio_xds_connection_terminations_total`: `connect` when the
    /// session never got its stream open, `stream` when an open stream ended.
    /// The `reason` label of `istio_xds_connection_terminations_total`, with Istio's values:
    /// the connection could not be made (`ConnectionError`), the stream failed (`Error`), istiod
    /// ended it (`Reconnect`: it asks clients to come back, as on its connection age limit), or
    /// our side ended it (`Complete`).
    pub fn kind(&self) -> &'static str {
        match self {
            XdsError::Endpoint { .. }
            | XdsError::Connect { .. }
            | XdsError::Token { .. }
            | XdsError::Header { .. }
            | XdsError::Open(_) => "ConnectionError",
            XdsError::Stream(_) => "Error",
            XdsError::ClosedByServer => "Reconnect",
            XdsError::RequestClosed => "Complete",
        }
    }

    /// The message with the causes below the direct one (a transport error's own cause says
    /// what actually failed: refused, timed out, certificate).
    pub fn describe(&self) -> String {
        use std::error::Error;
        let mut out = self.to_string();
        let mut cause = self.source().and_then(|s| s.source());
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_split_connect_from_stream() {
        assert_eq!(XdsError::Header { what: "CLUSTER_ID" }.kind(), "ConnectionError");
        assert_eq!(XdsError::Open(tonic::Status::unavailable("down")).kind(), "ConnectionError");
        assert_eq!(XdsError::Stream(tonic::Status::internal("reset")).kind(), "Error");
        assert_eq!(XdsError::ClosedByServer.kind(), "Reconnect");
        assert_eq!(XdsError::RequestClosed.kind(), "Complete");
        let token = XdsError::Token { path: "/t".into(), source: std::io::Error::other("gone") };
        assert_eq!(token.kind(), "ConnectionError");
        assert_eq!(token.describe(), "reading the token /t: gone");
    }
}
