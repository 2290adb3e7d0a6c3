//! How a command fails: bad configuration (exit 64, the message names the setting) or a
//! failure while running. Every command returns it; `main` turns it into the exit code.

pub enum Failure {
    /// Bad configuration: exit code 64.
    Config(String),
    Runtime(anyhow::Error),
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Failure::Runtime(error.into())
    }
}
