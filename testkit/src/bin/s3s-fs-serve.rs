//! `s3s-fs-serve --root DIR [--port P] [--host 127.0.0.1]`: the tests'
//! in-process S3 server (`testkit::S3Server::s3s_fs`) as a program for the
//! benchmark scripts. It prints `http://HOST:PORT` on stdout once it
//! listens and serves until killed. Port 0, the default, is a free one.

use std::io::Write;
use std::net::{TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use testkit::{S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, S3Server};

const USAGE: &str = "usage: s3s-fs-serve --root DIR [--port P] [--host 127.0.0.1]";

#[derive(Debug)]
struct Options {
    root: PathBuf,
    host: String,
    port: u16,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}\n\n{}", credentials());
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("s3s-fs-serve: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match bind(&options.host, options.port) {
        Ok(listener) => listener,
        Err(message) => {
            eprintln!("s3s-fs-serve: {message}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&options.root) {
        eprintln!(
            "s3s-fs-serve: cannot create {}: {e}",
            options.root.display()
        );
        return ExitCode::from(2);
    }
    let server = S3Server::s3s_fs_on(&options.root, listener);
    let mut stdout = std::io::stdout();
    // A reader that went away does not stop the server.
    let _ = writeln!(stdout, "{}", server.endpoint()).and_then(|()| stdout.flush());
    eprintln!("s3s-fs-serve: {}", credentials());
    loop {
        std::thread::park();
    }
}

fn credentials() -> String {
    format!(
        "clients authenticate as AWS_ACCESS_KEY_ID={S3_ACCESS_KEY_ID} \
         AWS_SECRET_ACCESS_KEY={S3_SECRET_ACCESS_KEY} AWS_REGION={S3_REGION}, path-style"
    )
}

/// The options, or None for `--help`.
fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut root = None;
    let mut host = "127.0.0.1".to_string();
    let mut port = 0;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--root" => root = Some(PathBuf::from(value("--root")?)),
            "--host" => host = value("--host")?,
            "--port" => {
                let text = value("--port")?;
                port = text
                    .parse()
                    .map_err(|_| format!("--port {text}: not a port number"))?;
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let root = root.ok_or("--root is required")?;
    Ok(Some(Options { root, host, port }))
}

fn bind(host: &str, port: u16) -> Result<TcpListener, String> {
    let addresses: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    TcpListener::bind(&addresses[..]).map_err(|e| format!("cannot listen on {host}:{port}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What parsing gives, as (root, host, port), None for `--help`.
    type Parsed = Result<Option<(String, String, u16)>, String>;

    fn parsed(args: &[&str]) -> Parsed {
        let options = parse(args.iter().map(|arg| arg.to_string()))?;
        Ok(options.map(|o| (o.root.display().to_string(), o.host, o.port)))
    }

    #[test]
    fn parse_takes_root_host_and_port_in_any_order() {
        let some = |root: &str, host: &str, port| Ok(Some((root.into(), host.into(), port)));
        let cases: &[(&[&str], Parsed)] = &[
            (&["--root", "/r"], some("/r", "127.0.0.1", 0)),
            (
                &["--port", "9000", "--root", "/r"],
                some("/r", "127.0.0.1", 9000),
            ),
            (&["--root", "/r", "--host", "::1"], some("/r", "::1", 0)),
            (&["--help"], Ok(None)),
            (&[], Err("--root is required".into())),
            (&["--root"], Err("--root needs a value".into())),
            (
                &["--root", "/r", "--port", "x"],
                Err("--port x: not a port number".into()),
            ),
            (
                &["--root", "/r", "--port", "70000"],
                Err("--port 70000: not a port number".into()),
            ),
            (&["/r"], Err("unknown argument /r".into())),
        ];
        for (args, expected) in cases {
            assert_eq!(&parsed(args), expected, "s3s-fs-serve {}", args.join(" "));
        }
    }
}
