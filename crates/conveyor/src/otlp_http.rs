//! The HTTP client under the OTLP exporter: the workspace's reqwest (rustls for `https`) with
//! the retries the OTLP spec asks for (<https://opentelemetry.io/docs/specs/otlp/#retryable-response-codes>):
//! a connection error, a timeout, 429, 502, 503 or 504 is tried again after an exponential
//! backoff with jitter (or the answer's `Retry-After`, capped), at most [`ATTEMPTS`] times.
//! Any other answer is returned to the exporter as it came.

use std::time::Duration;

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

/// Attempts per export request (the first and its retries).
pub const ATTEMPTS: u32 = 4;
/// The first retry's delay; doubled per retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts (also the cap on a `Retry-After`).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The delay before attempt `attempt + 1` (1-based `attempt`): exponential, with up to 50%
/// jitter so that several processes do not retry in step.
pub fn backoff(attempt: u32) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(MAX_BACKOFF);
    conveyor_core::retry::with_jitter(base, 0.5)
}

/// Whether an answer with `status` is worth another attempt.
pub fn retryable(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

#[derive(Debug, Clone)]
pub struct RetryingClient {
    client: reqwest::Client,
}

impl RetryingClient {
    pub fn new(client: reqwest::Client) -> RetryingClient {
        RetryingClient { client }
    }

    async fn send_once(
        &self,
        request: &Request<Bytes>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut builder = self
            .client
            .request(request.method().clone(), request.uri().to_string());
        for (name, value) in request.headers() {
            builder = builder.header(name, value);
        }
        builder.body(request.body().clone()).send().await
    }
}

#[async_trait::async_trait]
impl HttpClient for RetryingClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let mut attempt = 1;
        loop {
            let delay = match self.send_once(&request).await {
                Ok(response) if attempt < ATTEMPTS && retryable(response.status().as_u16()) => {
                    let asked = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    tracing::debug!(status = %response.status(), attempt, "OTLP export answered a retryable status");
                    asked.map_or_else(|| backoff(attempt), |d| d.min(MAX_BACKOFF))
                }
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    let body = response.bytes().await?;
                    let mut answer = Response::builder().status(status).body(body)?;
                    *answer.headers_mut() = headers;
                    return Ok(answer);
                }
                Err(error)
                    if attempt < ATTEMPTS
                        && (error.is_connect() || error.is_timeout() || error.is_request()) =>
                {
                    tracing::debug!(%error, attempt, "OTLP export request failed");
                    backoff(attempt)
                }
                Err(error) => return Err(Box::new(error)),
            };
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= FIRST_BACKOFF && backoff(1) <= FIRST_BACKOFF * 3 / 2);
        assert!(backoff(2) >= FIRST_BACKOFF * 2);
        assert!(backoff(30) <= MAX_BACKOFF * 3 / 2);
    }

    #[test]
    fn only_the_specs_codes_are_retried() {
        for status in [429, 502, 503, 504] {
            assert!(retryable(status), "{status}");
        }
        for status in [200, 400, 401, 404, 413, 500] {
            assert!(!retryable(status), "{status}");
        }
    }
}
