//! The controller driver against the simulated controller in `sim`.

mod sim;

use std::cell::RefCell;
use std::rc::Rc;

use peregrine_nvme::queue::Completion;
use peregrine_nvme::{
    cmd, regs, Config, Controller, DeviceError, Dma, Error, Namespace, StatusKind, Wait, PAGE_SIZE,
};
use peregrine_rng::Rng;
use sim::{FakeClock, FakeDma, Sim, SimMmio};

type Ctl = Controller<SimMmio, FakeDma, FakeClock>;

const DISK_BLOCKS: usize = 8192; // 4 MiB

fn setup_with(mqes: u16, dstrd: u32, config: Config) -> (Ctl, Rc<RefCell<Sim>>) {
    let dma = FakeDma::default();
    let sim = Rc::new(RefCell::new(Sim::new(
        dma.clone(),
        mqes,
        dstrd,
        DISK_BLOCKS,
    )));
    let ctl = Controller::new(SimMmio(sim.clone()), dma, FakeClock::default(), config);
    (ctl, sim)
}

fn setup() -> (Ctl, Rc<RefCell<Sim>>) {
    setup_with(1023, 0, Config::default())
}

/// init, identify, one I/O queue pair of `entries`: (controller, sim, namespace, qid).
fn ready(entries: u16, config: Config) -> (Ctl, Rc<RefCell<Sim>>, Namespace, u16) {
    let (mut ctl, sim) = setup_with(1023, 1, config);
    ctl.init().unwrap();
    ctl.identify_controller().unwrap();
    let ns = ctl.identify_namespace(1).unwrap();
    ctl.set_queue_count(1).unwrap();
    let qid = ctl.create_io_queue_pair(entries, None).unwrap();
    (ctl, sim, ns, qid)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.byte()).collect()
}

#[test]
fn init_and_identify() {
    let (mut ctl, sim) = setup();
    ctl.init().unwrap();
    {
        let s = sim.borrow();
        assert_eq!(s.cc, regs::CC_ENABLE);
        assert_ne!(s.csts & regs::csts::RDY, 0);
        assert_eq!(s.aqa, regs::aqa(32, 32));
    }
    let id = ctl.identify_controller().unwrap();
    assert_eq!(id.vid, 0x1b36);
    assert_eq!(id.serial(), "PEREGRINE-SIM-0001");
    assert_eq!(id.model(), "Peregrine simulated NVMe");
    assert_eq!(id.nn, 1);
    let ns = ctl.identify_namespace(1).unwrap();
    assert_eq!(
        ns,
        Namespace {
            nsid: 1,
            block_size: 512,
            blocks: DISK_BLOCKS as u64
        }
    );
    // An inactive namespace is an error status from the device.
    match ctl.identify_namespace(2) {
        Err(Error::Command(s)) => assert_eq!(s.kind(), StatusKind::InvalidNamespace),
        other => panic!("{other:?}"),
    }
    // Re-init works (disable, then enable again) and shutdown completes.
    ctl.init().unwrap();
    ctl.identify_controller().unwrap();
    ctl.shutdown().unwrap();
}

#[test]
fn admin_queue_capped_by_mqes() {
    let (mut ctl, sim) = setup_with(7, 0, Config::default());
    ctl.init().unwrap();
    assert_eq!(sim.borrow().aqa, regs::aqa(8, 8));
    // Many admin commands through an eight-entry queue.
    for _ in 0..40 {
        ctl.identify_controller().unwrap();
    }
    assert!(sim.borrow().cq_wraps >= 5);
}

#[test]
fn mdts_limits_transfers() {
    let (mut ctl, sim) = setup();
    sim.borrow_mut().mdts = 2; // 16 KiB
    ctl.init().unwrap();
    ctl.identify_controller().unwrap();
    assert_eq!(ctl.max_transfer_pages(), 4);
}

#[test]
fn queue_pairs() {
    let (mut ctl, sim) = setup_with(1023, 2, Config::default());
    ctl.init().unwrap();
    assert_eq!(ctl.set_queue_count(4).unwrap(), 4);
    let mut qids = Vec::new();
    for cpu in 0..4u16 {
        qids.push(ctl.create_io_queue_pair(64, Some(cpu + 1)).unwrap());
    }
    assert_eq!(qids, [1, 2, 3, 4]);
    assert_eq!(
        ctl.create_io_queue_pair(64, None),
        Err(Error::InvalidArgument)
    );
    for &q in &qids {
        assert!(sim.borrow().has_queue(q));
        assert_eq!(sim.borrow().cq_vector(q), Some(Some(q)));
    }
    ctl.delete_io_queue_pair(2).unwrap();
    assert!(!sim.borrow().has_queue(2));
    assert_eq!(ctl.flush(2, 1), Err(Error::InvalidArgument));
    assert_eq!(ctl.create_io_queue_pair(64, None).unwrap(), 2);
    assert_eq!(sim.borrow().cq_vector(2), Some(None));
    for &q in &qids {
        ctl.flush(q, 1).unwrap();
    }
    assert_eq!(sim.borrow().flushes, 4);
    assert_eq!(ctl.delete_io_queue_pair(9), Err(Error::InvalidArgument));
}

#[test]
fn controller_refusing_a_queue_is_an_error() {
    let (mut ctl, sim) = setup();
    ctl.init().unwrap();
    sim.borrow_mut().max_queues = 0; // refuses every queue id
    match ctl.create_io_queue_pair(16, None) {
        Err(Error::Command(s)) => assert_eq!(s.kind(), StatusKind::InvalidQueueId),
        other => panic!("{other:?}"),
    }
}

#[test]
fn write_then_read_across_prp_lists() {
    let (mut ctl, sim, ns, q) = ready(16, Config::default());
    let dma = ctl.dma().clone();
    // 3 pages + 1 KiB starting 512 bytes into a scattered buffer: five pages, a list.
    let len = 3 * PAGE_SIZE + 1024;
    let src = dma.alloc_scattered(len + 512);
    let data = pattern(len, 1);
    dma.write(&src, 512, &data);
    ctl.write(q, &ns, 100, &src, 512, len).unwrap();
    assert_eq!(sim.borrow().disk[100 * 512..100 * 512 + len], data[..]);
    // Read back at another offset, into another scattered buffer.
    let dst = dma.alloc_scattered(len + 4096);
    ctl.read(q, &ns, 100, &dst, 4096 - 512, len).unwrap();
    let mut back = vec![0; len];
    dma.read(&dst, 4096 - 512, &mut back);
    assert_eq!(back, data);
    // Exactly two pages (PRP2 direct) and one block.
    for (off, len) in [(0, 2 * PAGE_SIZE), (PAGE_SIZE - 512, 1024), (8, 512)] {
        let data = pattern(len, off as u64);
        dma.write(&src, off, &data);
        ctl.write(q, &ns, 7, &src, off, len).unwrap();
        ctl.read(q, &ns, 7, &dst, off, len).unwrap();
        let mut back = vec![0; len];
        dma.read(&dst, off, &mut back);
        assert_eq!(back, data);
    }
}

#[test]
fn chained_prp_lists() {
    let config = Config {
        max_transfer_pages: 1024,
        ..Config::default()
    };
    let (mut ctl, sim, ns, q) = ready(8, config);
    let dma = ctl.dma().clone();
    // 600 pages (+ a partial first page): two list pages, chained.
    let len = 600 * PAGE_SIZE;
    let buf = dma.alloc_scattered(len + PAGE_SIZE);
    let data = pattern(len, 2);
    dma.write(&buf, 2048, &data);
    ctl.write(q, &ns, 0, &buf, 2048, len).unwrap();
    assert_eq!(sim.borrow().io_commands, 1);
    assert_eq!(sim.borrow().disk[..len], data[..]);
    let out = dma.alloc_scattered(len);
    ctl.read(q, &ns, 0, &out, 0, len).unwrap();
    let mut back = vec![0; len];
    dma.read(&out, 0, &mut back);
    assert_eq!(back, data);
}

#[test]
fn large_transfers_are_split() {
    let config = Config {
        max_transfer_pages: 4,
        ..Config::default()
    };
    let (mut ctl, sim, ns, q) = ready(8, config);
    let dma = ctl.dma().clone();
    let len = 40 * 1024;
    let buf = dma.alloc_scattered(len + 4096);
    let data = pattern(len, 3);
    dma.write(&buf, 100 * 4, &data);
    ctl.write(q, &ns, 50, &buf, 100 * 4, len).unwrap();
    assert_eq!(sim.borrow().io_commands, 3); // 16 + 16 + 8 KiB
    assert_eq!(sim.borrow().disk[50 * 512..50 * 512 + len], data[..]);
}

#[test]
fn bad_io_arguments() {
    let (mut ctl, _sim, ns, q) = ready(8, Config::default());
    let dma = ctl.dma().clone();
    let buf = dma.alloc_scattered(PAGE_SIZE);
    assert_eq!(
        ctl.read(q, &ns, 0, &buf, 0, 100),
        Err(Error::InvalidArgument)
    );
    assert_eq!(
        ctl.read(q, &ns, 0, &buf, 2, 512),
        Err(Error::InvalidArgument)
    );
    assert_eq!(
        ctl.read(q, &ns, 0, &buf, 4096 - 256, 512),
        Err(Error::InvalidArgument)
    );
    assert_eq!(
        ctl.read(0, &ns, 0, &buf, 0, 512),
        Err(Error::InvalidArgument)
    );
    assert_eq!(
        ctl.read(5, &ns, 0, &buf, 0, 512),
        Err(Error::InvalidArgument)
    );
}

#[test]
fn phase_tag_wraps_many_times() {
    let (mut ctl, sim, ns, q) = ready(4, Config::default());
    let dma = ctl.dma().clone();
    let buf = dma.alloc_scattered(PAGE_SIZE);
    for i in 0..1000u64 {
        if i % 3 == 0 {
            ctl.flush(q, 1).unwrap();
        } else {
            let data = pattern(512, i);
            dma.write(&buf, 0, &data);
            ctl.write(q, &ns, i, &buf, 0, 512).unwrap();
            ctl.read(q, &ns, i, &buf, 512, 512).unwrap();
            let mut back = vec![0; 512];
            dma.read(&buf, 512, &mut back);
            assert_eq!(back, data);
        }
    }
    assert!(sim.borrow().cq_wraps > 400);
}

#[test]
fn async_submissions_fill_the_queue() {
    let (mut ctl, sim, _ns, q) = ready(8, Config::default());
    sim.borrow_mut().faults.drop_io = true;
    let mut cids = Vec::new();
    for _ in 0..7 {
        cids.push(ctl.submit(q, cmd::flush(1)).unwrap());
    }
    assert_eq!(ctl.submit(q, cmd::flush(1)), Err(Error::QueueFull));
    assert_eq!(ctl.poll_completions(q), Ok(0));
    sim.borrow_mut().complete_dropped();
    assert_eq!(ctl.poll_completions(q), Ok(7));
    for cid in cids {
        let c: Completion = ctl.take_completion(q, cid).unwrap();
        assert!(c.status.is_success());
    }
    sim.borrow_mut().faults.drop_io = false;
    ctl.flush(q, 1).unwrap();
}

#[test]
fn never_ready_times_out() {
    let (mut ctl, sim) = setup();
    sim.borrow_mut().faults.never_ready = true;
    assert_eq!(ctl.init(), Err(Error::Timeout(Wait::Enable)));
    // CAP.TO is 2 (1 s); the fake clock ticks once per read.
    assert!(ctl.clock().0.get() < 3000);
}

#[test]
fn stuck_ready_times_out() {
    let (mut ctl, sim) = setup();
    ctl.init().unwrap();
    sim.borrow_mut().faults.stuck_ready = true;
    assert_eq!(ctl.init(), Err(Error::Timeout(Wait::Disable)));
}

#[test]
fn fatal_status_is_reported() {
    let (mut ctl, sim) = setup();
    sim.borrow_mut().faults.fatal_on_enable = true;
    assert_eq!(ctl.init(), Err(Error::Fatal));
    // A fatal controller mid-command: the wait ends with Fatal, not a plain timeout.
    let (mut ctl, sim, _ns, q) = ready(8, Config::default());
    sim.borrow_mut().faults.drop_io = true;
    sim.borrow_mut().csts |= regs::csts::CFS;
    assert_eq!(ctl.flush(q, 1), Err(Error::Fatal));
}

#[test]
fn device_gone() {
    let (mut ctl, sim) = setup();
    sim.borrow_mut().faults.gone = true;
    assert_eq!(ctl.init(), Err(Error::Gone));
}

#[test]
fn lost_command_times_out_then_completes_late() {
    let config = Config {
        command_timeout_ms: 50,
        ..Config::default()
    };
    let (mut ctl, sim, _ns, q) = ready(2, config);
    sim.borrow_mut().faults.drop_io = true;
    match ctl.flush(q, 1) {
        Err(Error::Timeout(Wait::Command { qid, .. })) => assert_eq!(qid, q),
        other => panic!("{other:?}"),
    }
    // The id stays reserved: a two-entry queue is now full.
    assert_eq!(ctl.flush(q, 1), Err(Error::QueueFull));
    sim.borrow_mut().faults.drop_io = false;
    sim.borrow_mut().complete_dropped();
    assert_eq!(ctl.poll_completions(q), Ok(0)); // late: nobody waits for it
    ctl.flush(q, 1).unwrap();
}

#[test]
fn error_status_is_surfaced() {
    let (mut ctl, _sim, ns, q) = ready(8, Config::default());
    let dma = ctl.dma().clone();
    let buf = dma.alloc_scattered(2 * PAGE_SIZE);
    match ctl.read(q, &ns, DISK_BLOCKS as u64 - 1, &buf, 0, 1024) {
        Err(Error::Command(s)) => {
            assert_eq!(s.kind(), StatusKind::LbaOutOfRange);
            assert!(s.dnr);
        }
        other => panic!("{other:?}"),
    }
    let other_ns = Namespace { nsid: 9, ..ns };
    match ctl.write(q, &other_ns, 0, &buf, 0, 512) {
        Err(Error::Command(s)) => assert_eq!(s.kind(), StatusKind::InvalidNamespace),
        other => panic!("{other:?}"),
    }
    // The queue keeps working.
    ctl.read(q, &ns, 0, &buf, 0, 1024).unwrap();
}

#[test]
fn unknown_cid_is_a_device_error() {
    let (mut ctl, sim, _ns, q) = ready(8, Config::default());
    sim.borrow_mut().faults.corrupt = Some(Box::new(|c| c.cid ^= 0x40));
    match ctl.flush(q, 1) {
        Err(Error::Device(DeviceError::UnknownCid { qid, .. })) => assert_eq!(qid, q),
        other => panic!("{other:?}"),
    }
    sim.borrow_mut().faults.corrupt = None;
    // The abandoned id stays reserved; other ids still work.
    ctl.flush(q, 1).unwrap();
}

#[test]
fn bad_sq_fields_are_device_errors() {
    let (mut ctl, sim, _ns, q) = ready(8, Config::default());
    sim.borrow_mut().faults.corrupt = Some(Box::new(|c| c.sq_head = 7));
    assert!(matches!(
        ctl.flush(q, 1),
        Err(Error::Device(DeviceError::BadSqHead { .. }))
    ));
    sim.borrow_mut().faults.corrupt = Some(Box::new(|c| c.sqid = 0));
    assert!(matches!(
        ctl.flush(q, 1),
        Err(Error::Device(DeviceError::BadSqId { .. }))
    ));
}

#[test]
fn garbage_completions_never_panic() {
    let (mut ctl, sim, ns, q) = ready(
        16,
        Config {
            command_timeout_ms: 20,
            ..Config::default()
        },
    );
    let dma = ctl.dma().clone();
    let buf = dma.alloc_scattered(4 * PAGE_SIZE);
    let rng = Rc::new(RefCell::new(Rng::new(0x5eed)));
    let r = rng.clone();
    sim.borrow_mut().faults.corrupt = Some(Box::new(move |c| {
        let mut r = r.borrow_mut();
        // Keep the phase (or the entry is invisible) and scramble the rest sometimes.
        if r.chance(2) {
            c.cid = r.next_u64() as u16;
        }
        if r.chance(3) {
            c.sq_head = r.next_u64() as u16;
        }
        if r.chance(4) {
            c.sqid = r.below(3) as u16;
        }
        if r.chance(3) {
            c.status = peregrine_nvme::Status::from_field(r.next_u64() as u16 & 0x7fff);
        }
        c.dw0 = r.next_u64() as u32;
    }));
    let (mut ok, mut err) = (0, 0);
    for i in 0..500u64 {
        let result = match i % 3 {
            0 => ctl.flush(q, 1),
            1 => ctl.write(q, &ns, i, &buf, 0, 2048),
            _ => ctl.read(q, &ns, i, &buf, 4, 4096),
        };
        match result {
            Ok(()) => ok += 1,
            Err(Error::QueueFull) => {
                // Every id abandoned: only a reset recovers.
                ctl.init().unwrap();
                ctl.create_io_queue_pair(16, None).unwrap();
                err += 1;
            }
            Err(_) => err += 1,
        }
    }
    assert!(ok > 0 && err > 0, "ok {ok} err {err}");
}

#[test]
fn random_io_matches_a_model() {
    let config = Config {
        max_transfer_pages: 8,
        ..Config::default()
    };
    let (mut ctl, sim, ns, q) = ready(8, config);
    let dma = ctl.dma().clone();
    let buf = dma.alloc_scattered(16 * PAGE_SIZE);
    let mut model = vec![0u8; DISK_BLOCKS * 512];
    let mut rng = Rng::new(11);
    for _ in 0..300 {
        let blocks = 1 + rng.below(40) as usize;
        let len = blocks * 512;
        let off = 4 * rng.below(((16 * PAGE_SIZE - len) / 4) as u64) as usize;
        let lba = rng.below((DISK_BLOCKS - blocks) as u64);
        let at = lba as usize * 512;
        if rng.chance(2) {
            let data: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            dma.write(&buf, off, &data);
            ctl.write(q, &ns, lba, &buf, off, len).unwrap();
            model[at..at + len].copy_from_slice(&data);
        } else {
            ctl.read(q, &ns, lba, &buf, off, len).unwrap();
            let mut back = vec![0; len];
            dma.read(&buf, off, &mut back);
            assert_eq!(back, model[at..at + len]);
        }
    }
    assert_eq!(sim.borrow().disk, model);
}

#[test]
fn failure_mid_command_ends_the_wait_early() {
    let config = Config {
        command_timeout_ms: 1_000_000,
        ..Config::default()
    };
    let (mut ctl, sim, _ns, q) = ready(8, config);
    sim.borrow_mut().faults.drop_io = true;
    sim.borrow_mut().csts |= regs::csts::CFS;
    let before = ctl.clock().0.get();
    assert_eq!(ctl.flush(q, 1), Err(Error::Fatal));
    assert!(ctl.clock().0.get() - before < 1000);
    // A reset recovers (disabling clears CFS in the simulator).
    sim.borrow_mut().faults.drop_io = false;
    ctl.init().unwrap();
    let q = ctl.create_io_queue_pair(8, None).unwrap();
    ctl.flush(q, 1).unwrap();
    // Surprise removal mid-command.
    sim.borrow_mut().faults.drop_io = true;
    let cid = ctl.submit(q, cmd::flush(1)).unwrap();
    sim.borrow_mut().faults.gone = true;
    assert_eq!(ctl.wait(q, cid, 1_000_000), Err(Error::Gone));
}

#[test]
fn reinit_after_a_failed_enable() {
    let (mut ctl, sim) = setup();
    sim.borrow_mut().faults.never_ready = true;
    assert_eq!(ctl.init(), Err(Error::Timeout(Wait::Enable)));
    // CC.EN = 1 with RDY = 0: disabling waits out the transition, then clears EN.
    sim.borrow_mut().faults.never_ready = false;
    ctl.init().unwrap();
    ctl.identify_controller().unwrap();
}

#[test]
fn queue_deletion_refused_keeps_the_pair() {
    let (mut ctl, sim, _ns, q) = ready(8, Config::default());
    sim.borrow_mut().faults.refuse_delete_sq = true;
    match ctl.delete_io_queue_pair(q) {
        Err(Error::Command(s)) => assert_eq!(s.kind(), StatusKind::InvalidQueueId),
        other => panic!("{other:?}"),
    }
    ctl.flush(q, 1).unwrap();
    sim.borrow_mut().faults.refuse_delete_sq = false;
    ctl.delete_io_queue_pair(q).unwrap();
    assert_eq!(ctl.flush(q, 1), Err(Error::InvalidArgument));
}
