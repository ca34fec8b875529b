//! Codec tests: known layouts, digests, round trips and hostile input.

use super::*;
use proptest::prelude::*;

fn enc_dec(pdu: &Pdu, digests: Digests) -> Pdu {
    let bytes = pdu.encode(digests);
    match decode(&bytes, digests, MAX_DATA_SEGMENT).unwrap() {
        Decoded::Complete { pdu, len, data_digest_ok } => {
            assert_eq!(len, bytes.len());
            assert!(data_digest_ok);
            pdu
        }
        Decoded::Incomplete(n) => panic!("incomplete: {n} of {}", bytes.len()),
    }
}

#[test]
fn crc32c_matches_rfc_vector() {
    // RFC 3720 B.4: 32 bytes of zeros.
    assert_eq!(crc32c(&[&[0u8; 32]]).to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
    // 32 bytes of 0xff.
    assert_eq!(crc32c(&[&[0xffu8; 32]]).to_le_bytes(), [0x43, 0xab, 0xa8, 0x62]);
}

#[test]
fn login_request_layout() {
    let pdu = Pdu::LoginRequest(LoginRequest {
        transit: true,
        cont: false,
        csg: 1,
        nsg: 3,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 1, 2, 3, 4, 5],
        tsih: 0,
        itt: 7,
        cid: 1,
        cmd_sn: 9,
        exp_stat_sn: 0,
        data: Bytes::from_static(b"InitiatorName=iqn.x\0"),
    });
    let b = pdu.encode(Digests::default());
    assert_eq!(b[0], 0x43);
    assert_eq!(b[1], 0x80 | (1 << 2) | 3);
    assert_eq!(&b[5..8], &[0, 0, 20]);
    assert_eq!(b.len(), 48 + 20);
    assert_eq!(enc_dec(&pdu, Digests::default()), pdu);
}

#[test]
fn data_is_padded_and_digested() {
    let pdu = Pdu::NopIn(NopIn {
        lun: 0,
        itt: 1,
        ttt: RESERVED_TAG,
        stat_sn: 2,
        exp_cmd_sn: 3,
        max_cmd_sn: 4,
        data: Bytes::from_static(b"abcde"),
    });
    let d = Digests { header: true, data: true };
    let b = pdu.encode(d);
    assert_eq!(b.len(), 48 + 4 + 8 + 4);
    assert_eq!(enc_dec(&pdu, d), pdu);
    // A flipped data byte is reported, not hidden.
    let mut bad = b.clone();
    bad[48 + 4] ^= 1;
    match decode(&bad, d, 1 << 20).unwrap() {
        Decoded::Complete { data_digest_ok, .. } => assert!(!data_digest_ok),
        other => panic!("{other:?}"),
    }
    // A flipped header byte fails the header digest.
    let mut bad = b;
    bad[20] ^= 1;
    assert_eq!(decode(&bad, d, 1 << 20), Err(PduError::HeaderDigest));
}

#[test]
fn oversized_data_is_refused_before_reading_it() {
    let mut b = [0u8; 48];
    b[0] = opcode::DATA_OUT;
    b[5..8].copy_from_slice(&[0x10, 0, 0]);
    assert_eq!(
        decode(&b, Digests::default(), 65536),
        Err(PduError::DataTooLong { len: 0x100000, max: 65536 })
    );
}

#[test]
fn unknown_opcode_and_incomplete() {
    let mut b = [0u8; 48];
    b[0] = 0x1c;
    assert_eq!(decode(&b, Digests::default(), 8192), Err(PduError::UnknownOpcode(0x1c)));
    assert_eq!(decode(&b[..10], Digests::default(), 8192), Ok(Decoded::Incomplete(48)));
    b[0] = opcode::NOP_OUT;
    b[7] = 5;
    assert_eq!(decode(&b, Digests::default(), 8192), Ok(Decoded::Incomplete(56)));
}

#[test]
fn extended_cdb_uses_ahs() {
    let pdu = Pdu::ScsiCommand(ScsiCommand {
        immediate: false,
        final_: true,
        read: true,
        write: false,
        attr: 1,
        lun: 0,
        itt: 5,
        edtl: 512,
        cmd_sn: 1,
        exp_stat_sn: 1,
        cdb: (0..32).collect(),
        bidi_read_len: Some(77),
        data: Bytes::new(),
    });
    assert_eq!(enc_dec(&pdu, Digests { header: true, data: false }), pdu);
}

#[test]
fn serial_arithmetic() {
    assert!(sn_lt(1, 2));
    assert!(sn_lt(u32::MAX, 0));
    assert!(!sn_lt(0, u32::MAX));
    assert!(sn_le(5, 5));
    assert!(!sn_lt(5, 5));
}

#[test]
fn residuals() {
    assert_eq!(Residual::of(512, 1024), Residual { overflow: true, underflow: false, count: 512 });
    assert_eq!(Residual::of(10000, 512), Residual { overflow: false, underflow: true, count: 9488 });
    assert_eq!(Residual::of(7, 7), Residual::default());
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn pdu_strategy() -> impl Strategy<Value = Pdu> {
    let residual = (any::<bool>(), any::<bool>(), any::<u32>())
        .prop_map(|(overflow, underflow, count)| Residual { overflow, underflow, count });
    prop_oneof![
        (any::<bool>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>(), bytes(64))
            .prop_map(|(immediate, lun, itt, ttt, cmd_sn, exp_stat_sn, data)| Pdu::NopOut(NopOut {
                immediate,
                lun,
                itt,
                ttt,
                cmd_sn,
                exp_stat_sn,
                data
            })),
        (
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), 0u8..8, any::<u64>()),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
            (proptest::collection::vec(any::<u8>(), 0..48), proptest::option::of(any::<u32>()), bytes(64))
        )
            .prop_map(
                |(
                    (immediate, final_, read, write, attr, lun),
                    (itt, edtl, cmd_sn, exp_stat_sn),
                    (extra, bidi_read_len, data),
                )| {
                    let mut cdb = vec![0x28; 16];
                    cdb.extend(extra);
                    Pdu::ScsiCommand(ScsiCommand {
                        immediate,
                        final_,
                        read,
                        write,
                        attr,
                        lun,
                        itt,
                        edtl,
                        cmd_sn,
                        exp_stat_sn,
                        cdb,
                        bidi_read_len,
                        data,
                    })
                }
            ),
        (any::<bool>(), 0u8..128, any::<u64>(), any::<[u32; 6]>()).prop_map(
            |(immediate, function, lun, v)| {
                Pdu::TaskMgmtRequest(TaskMgmtRequest {
                    immediate,
                    function,
                    lun,
                    itt: v[0],
                    ref_itt: v[1],
                    cmd_sn: v[2],
                    exp_stat_sn: v[3],
                    ref_cmd_sn: v[4],
                    exp_data_sn: v[5],
                })
            }
        ),
        (
            any::<bool>(),
            any::<bool>(),
            0u8..4,
            0u8..4,
            any::<[u8; 2]>(),
            any::<[u8; 6]>(),
            any::<u16>(),
            any::<[u32; 3]>(),
            any::<u16>(),
            bytes(64)
        )
            .prop_map(|(transit, cont, csg, nsg, v, isid, tsih, n, cid, data)| Pdu::LoginRequest(
                LoginRequest {
                    transit,
                    cont,
                    csg,
                    nsg,
                    version_max: v[0],
                    version_min: v[1],
                    isid,
                    tsih,
                    itt: n[0],
                    cid,
                    cmd_sn: n[1],
                    exp_stat_sn: n[2],
                    data,
                }
            )),
        (any::<[bool; 3]>(), any::<u64>(), any::<[u32; 4]>(), bytes(64)).prop_map(|(f, lun, n, data)| {
            Pdu::TextRequest(TextRequest {
                immediate: f[0],
                final_: f[1],
                cont: f[2],
                lun,
                itt: n[0],
                ttt: n[1],
                cmd_sn: n[2],
                exp_stat_sn: n[3],
                data,
            })
        }),
        (any::<bool>(), any::<u64>(), any::<[u32; 5]>(), bytes(64)).prop_map(|(final_, lun, n, data)| {
            Pdu::DataOut(DataOut {
                final_,
                lun,
                itt: n[0],
                ttt: n[1],
                exp_stat_sn: n[2],
                data_sn: n[3],
                offset: n[4],
                data,
            })
        }),
        (any::<bool>(), 0u8..128, any::<u32>(), any::<u16>(), any::<[u32; 2]>()).prop_map(
            |(immediate, reason, itt, cid, n)| Pdu::LogoutRequest(LogoutRequest {
                immediate,
                reason,
                itt,
                cid,
                cmd_sn: n[0],
                exp_stat_sn: n[1],
            })
        ),
        (0u8..16, any::<u64>(), any::<[u32; 5]>()).prop_map(|(kind, lun, n)| Pdu::SnackRequest(
            SnackRequest {
                kind,
                lun,
                itt: n[0],
                ttt: n[1],
                exp_stat_sn: n[2],
                beg_run: n[3],
                run_length: n[4],
            }
        )),
        (any::<u64>(), any::<[u32; 5]>(), bytes(64)).prop_map(|(lun, n, data)| Pdu::NopIn(NopIn {
            lun,
            itt: n[0],
            ttt: n[1],
            stat_sn: n[2],
            exp_cmd_sn: n[3],
            max_cmd_sn: n[4],
            data,
        })),
        (any::<[bool; 2]>(), residual.clone(), any::<[u8; 2]>(), any::<[u32; 7]>(), bytes(64)).prop_map(
            |(f, residual, v, n, data)| Pdu::ScsiResponse(ScsiResponse {
                bidi_overflow: f[0],
                bidi_underflow: f[1],
                residual,
                response: v[0],
                status: v[1],
                itt: n[0],
                snack_tag: n[1],
                stat_sn: n[2],
                exp_cmd_sn: n[3],
                max_cmd_sn: n[4],
                exp_data_sn: n[5],
                bidi_residual: n[6],
                data,
            })
        ),
        (any::<u8>(), any::<[u32; 4]>()).prop_map(|(response, n)| Pdu::TaskMgmtResponse(TaskMgmtResponse {
            response,
            itt: n[0],
            stat_sn: n[1],
            exp_cmd_sn: n[2],
            max_cmd_sn: n[3],
        })),
        (
            any::<[bool; 2]>(),
            0u8..4,
            0u8..4,
            any::<[u8; 4]>(),
            any::<[u8; 6]>(),
            any::<u16>(),
            any::<[u32; 4]>(),
            bytes(64)
        )
            .prop_map(|(f, csg, nsg, v, isid, tsih, n, data)| Pdu::LoginResponse(LoginResponse {
                transit: f[0],
                cont: f[1],
                csg,
                nsg,
                version_max: v[0],
                version_active: v[1],
                isid,
                tsih,
                itt: n[0],
                stat_sn: n[1],
                exp_cmd_sn: n[2],
                max_cmd_sn: n[3],
                status_class: v[2],
                status_detail: v[3],
                data,
            })),
        (any::<[bool; 2]>(), any::<u64>(), any::<[u32; 5]>(), bytes(64)).prop_map(|(f, lun, n, data)| {
            Pdu::TextResponse(TextResponse {
                final_: f[0],
                cont: f[1],
                lun,
                itt: n[0],
                ttt: n[1],
                stat_sn: n[2],
                exp_cmd_sn: n[3],
                max_cmd_sn: n[4],
                data,
            })
        }),
        (
            any::<[bool; 2]>(),
            residual,
            proptest::option::of(any::<u8>()),
            any::<u64>(),
            any::<[u32; 8]>(),
            bytes(64)
        )
            .prop_map(|(f, residual, status, lun, n, data)| Pdu::DataIn(DataIn {
                final_: f[0],
                ack: f[1],
                residual,
                status,
                lun,
                itt: n[0],
                ttt: n[1],
                stat_sn: n[2],
                exp_cmd_sn: n[3],
                max_cmd_sn: n[4],
                data_sn: n[5],
                offset: n[6],
                data,
            })),
        (any::<u8>(), any::<[u32; 4]>(), any::<[u16; 2]>()).prop_map(|(response, n, t)| Pdu::LogoutResponse(
            LogoutResponse {
                response,
                itt: n[0],
                stat_sn: n[1],
                exp_cmd_sn: n[2],
                max_cmd_sn: n[3],
                time2wait: t[0],
                time2retain: t[1],
            }
        )),
        (any::<u64>(), any::<[u32; 8]>()).prop_map(|(lun, n)| Pdu::R2t(R2t {
            lun,
            itt: n[0],
            ttt: n[1],
            stat_sn: n[2],
            exp_cmd_sn: n[3],
            max_cmd_sn: n[4],
            r2t_sn: n[5],
            offset: n[6],
            desired_len: n[7],
        })),
        (any::<u64>(), any::<[u32; 3]>(), any::<[u8; 2]>(), any::<[u16; 3]>(), bytes(64)).prop_map(
            |(lun, n, e, parameters, data)| Pdu::AsyncMessage(AsyncMessage {
                lun,
                stat_sn: n[0],
                exp_cmd_sn: n[1],
                max_cmd_sn: n[2],
                event: e[0],
                vcode: e[1],
                parameters,
                data,
            })
        ),
        (any::<u8>(), any::<[u32; 4]>(), bytes(64)).prop_map(|(reason, n, data)| Pdu::Reject(Reject {
            reason,
            stat_sn: n[0],
            exp_cmd_sn: n[1],
            max_cmd_sn: n[2],
            data_sn: n[3],
            data,
        })),
    ]
}

fn digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

proptest! {
    #[test]
    fn pdu_round_trip(pdu in pdu_strategy(), d in digests()) {
        prop_assert_eq!(enc_dec(&pdu, d), pdu);
    }

    #[test]
    fn truncated_pdus_are_incomplete(pdu in pdu_strategy(), d in digests(), cut in 0usize..200) {
        let bytes = pdu.encode(d);
        let cut = cut.min(bytes.len().saturating_sub(1));
        match decode(&bytes[..cut], d, MAX_DATA_SEGMENT) {
            Ok(Decoded::Incomplete(n)) => prop_assert!(n > cut),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..400), d in digests()) {
        let _ = decode(&buf, d, 8192);
    }

    #[test]
    fn random_headers_with_valid_opcodes_never_panic(
        mut head in any::<[u8; 48]>(),
        op in proptest::sample::select(vec![0x00u8, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3f]),
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        head[0] = op | (head[0] & 0x40);
        // Keep the declared lengths small enough to be satisfiable.
        head[4] %= 8;
        head[5] = 0;
        head[6] = 0;
        let mut buf = head.to_vec();
        buf.extend(tail);
        let _ = decode(&buf, Digests::default(), 8192);
    }
}
