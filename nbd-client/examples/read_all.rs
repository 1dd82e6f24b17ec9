//! Reads a whole export with many requests in flight and prints the rate:
//! `cargo run --release -p nbd-client --example read_all -- URI [REQUEST_BYTES] [IN_FLIGHT]`.
//! A rough sanity check of the pipeline, not a benchmark.

use std::collections::VecDeque;
use std::time::Instant;

use nbd_client::{Client, ConnectOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let uri = args
        .next()
        .ok_or("usage: read_all URI [REQUEST_BYTES] [IN_FLIGHT]")?;
    let request_bytes: u64 = args.next().map_or(Ok(256 * 1024), |a| a.parse())?;
    let in_flight: usize = args.next().map_or(Ok(64), |a| a.parse())?;
    let options = ConnectOptions {
        in_flight_max: in_flight,
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(&uri, &options)?;
    let size = client.size_bytes();
    let started = Instant::now();
    let mut queue = VecDeque::with_capacity(in_flight);
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut offset = 0;
    while offset < size || !queue.is_empty() {
        while offset < size && queue.len() < in_flight {
            let length = request_bytes.min(size - offset) as usize;
            let mut buffer = spare.pop().unwrap_or_default();
            buffer.resize(length, 0);
            queue.push_back(client.submit_read(offset, buffer)?);
            offset += length as u64;
        }
        if let Some(pending) = queue.pop_front() {
            spare.push(pending.wait()?);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "read {} MiB in {seconds:.3} s: {:.0} MiB/s ({request_bytes}-byte requests, {in_flight} in flight, {:?})",
        size >> 20,
        (size >> 20) as f64 / seconds,
        client.info().reply_mode
    );
    client.close()?;
    Ok(())
}
