use storage::{open, BlockDevice, OpenOptions};
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&args[1]);
    let cmd = args[2].as_str();
    if cmd.starts_with("snap") || cmd.starts_with("vm") {
        let mut q = storage::qcow2::Qcow2Image::open(path, &OpenOptions::default()).unwrap();
        match cmd {
            "snapc" => { let e = q.create_snapshot(&args[3], 0, 0).unwrap(); println!("{e:?}"); }
            "snapa" => q.apply_snapshot(&args[3]).unwrap(),
            "snapd" => q.delete_snapshot(&args[3]).unwrap(),
            "snapl" => for s in q.snapshots() { println!("{s:?}"); },
            "vmsave" => { let n: usize = args[4].parse().unwrap(); let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect(); q.write_vm_state(&data, 0).unwrap(); q.create_snapshot(&args[3], 0, n as u64).unwrap(); }
            "vmload" => { let e = q.snapshots()[q.find_snapshot(&args[3]).unwrap()].clone(); let mut b = vec![0; e.vm_state_size as usize]; q.read_vm_state(&args[3], &mut b, 0).unwrap(); assert!(b.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8)); println!("vm ok {}", b.len()); }
            _ => panic!(),
        }
        return;
    }
    let d = open(path, &OpenOptions::default()).unwrap();
    match cmd {
        "write" => {
            let off: u64 = args[3].parse().unwrap();
            let len: usize = args[4].parse().unwrap();
            let pat: u8 = args[5].parse().unwrap();
            d.write_at(&vec![pat; len], off).unwrap();
            d.flush().unwrap();
        }
        "read" => {
            let off: u64 = args[3].parse().unwrap();
            let len: usize = args[4].parse().unwrap();
            let mut b = vec![0; len];
            d.read_at(&mut b, off).unwrap();
            let mut counts = std::collections::BTreeMap::new();
            for x in b { *counts.entry(x).or_insert(0) += 1; }
            println!("{counts:?}");
        }
        "zero" => { d.write_zeroes(args[3].parse().unwrap(), args[4].parse().unwrap()).unwrap(); }
        "discard" => { d.discard(args[3].parse().unwrap(), args[4].parse().unwrap()).unwrap(); }
        _ => panic!(),
    }
}
