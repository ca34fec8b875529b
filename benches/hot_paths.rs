//! criterion micro-benchmarks of the data path's hot spots: the replica
//! wire codec, the NBD request parser, block checksums, the store's
//! per-block records, and the write range lock.
//!
//! `cargo bench --bench hot_paths` measures; `-- --test` runs each once.

use std::hint::black_box;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jiva_core::range_lock::RangeLock;
use jiva_core::wire::{self, Opcode, Request, Response};
use jiva_replica::format::{self, BlockRecord};

fn wire_codec(c: &mut Criterion) {
    let data = Bytes::from(vec![7u8; 4096]);
    let req = Request {
        opcode: Opcode::Write,
        flags: 0,
        tag: 42,
        offset: 1 << 30,
        length: 4096,
        generation: 0,
        crc: 0,
        data,
    };
    let mut frame = BytesMut::new();
    wire::encode_request_header(&req, &mut frame);
    frame.put_slice(&req.data);
    let frame = frame.freeze();

    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode request header", |b| {
        let mut out = BytesMut::with_capacity(64);
        b.iter(|| {
            out.clear();
            wire::encode_request_header(black_box(&req), &mut out);
        })
    });
    g.bench_function("decode 4k write", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&frame[..]);
            black_box(wire::decode_request(&mut buf).unwrap().unwrap());
        })
    });
    let resp = Response::ok(42, Bytes::from(vec![1u8; 4096]));
    let mut rframe = BytesMut::new();
    wire::encode_response_header(&resp, &mut rframe);
    rframe.put_slice(&resp.payload);
    g.bench_function("decode 4k read response", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&rframe[..]);
            black_box(wire::decode_response(&mut buf).unwrap().unwrap());
        })
    });
    g.finish();
}

fn nbd_parse(c: &mut Criterion) {
    let req = jiva_nbd::proto::Request { flags: 0, command: 1, cookie: 9, offset: 4096, length: 4096 };
    let raw = req.encode();
    c.bench_function("nbd/parse request header", |b| {
        b.iter(|| black_box(jiva_nbd::proto::Request::parse(black_box(&raw)).unwrap()))
    });
}

fn checksums(c: &mut Criterion) {
    let block = vec![0x5au8; 4096];
    let mut g = c.benchmark_group("checksum");
    g.throughput(Throughput::Bytes(4096));
    // The one stored blocks carry, and the crate the first stores used.
    g.bench_function("crc32c 4 KiB", |b| b.iter(|| black_box(jiva_core::crc32c(black_box(&block)))));
    g.bench_function("crc32c 4 KiB (crc32c crate)", |b| {
        b.iter(|| black_box(crc32c::crc32c(black_box(&block))))
    });
    g.finish();

    let mut g = c.benchmark_group("records");
    let mut page = vec![0u8; 4096];
    g.throughput(Throughput::Elements(256));
    g.bench_function("encode 256 records", |b| {
        b.iter(|| {
            for (i, chunk) in page.chunks_mut(format::RECORD_SIZE as usize).enumerate() {
                format::encode_record(&BlockRecord::data(i as u32), chunk);
            }
            black_box(&page);
        })
    });
    g.bench_function("decode 256 records", |b| {
        b.iter(|| {
            for chunk in page.chunks(format::RECORD_SIZE as usize) {
                black_box(format::decode_record(chunk).unwrap());
            }
        })
    });
    g.finish();
}

fn range_lock(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let lock = RangeLock::new();
    c.bench_function("range lock/uncontended lock+unlock", |b| {
        b.iter(|| {
            rt.block_on(async {
                let g = lock.lock(black_box(4096), 8192, true).await;
                drop(g);
            })
        })
    });
}

criterion_group!(benches, wire_codec, nbd_parse, checksums, range_lock);
criterion_main!(benches);
