// An .npz of float32 arrays, as numpy.savez writes it (a ZIP archive, entries stored uncompressed)
// -> {name: {shape, data: Float32Array}}, read through the archive's central directory (ZIP64 sizes too).
import { parseNpy } from "./npy.js";

export function parseNpz(buf) {
  const view = new DataView(buf), bytes = new Uint8Array(buf);
  let end = buf.byteLength - 22;
  while (end >= 0 && view.getUint32(end, true) !== 0x06054b50) end--;  // end of central directory (a comment may follow)
  if (end < 0) throw new Error("not an .npz file: no ZIP central directory");
  const entries = view.getUint16(end + 10, true);
  let at = view.getUint32(end + 16, true);
  const out = {};
  for (let i = 0; i < entries; i++) {
    if (view.getUint32(at, true) !== 0x02014b50) throw new Error("a corrupt .npz: bad central directory entry");
    const method = view.getUint16(at + 10, true), nameLen = view.getUint16(at + 28, true);
    const extraLen = view.getUint16(at + 30, true), commentLen = view.getUint16(at + 32, true);
    let size = view.getUint32(at + 24, true), offset = view.getUint32(at + 42, true);
    const name = new TextDecoder().decode(bytes.subarray(at + 46, at + 46 + nameLen));
    for (let x = at + 46 + nameLen; x < at + 46 + nameLen + extraLen; ) {  // ZIP64: the 8-byte values that overflowed
      const id = view.getUint16(x, true), len = view.getUint16(x + 2, true);
      if (id === 0x0001) {
        let y = x + 4;
        if (size === 0xffffffff) { size = Number(view.getBigUint64(y, true)); y += 8; }
        if (view.getUint32(at + 20, true) === 0xffffffff) y += 8;  // the compressed size, equal when stored
        if (offset === 0xffffffff) offset = Number(view.getBigUint64(y, true));
      }
      x += 4 + len;
    }
    if (method !== 0) throw new Error(`${name} is compressed: the device reads numpy.savez's stored entries only`);
    const start = offset + 30 + view.getUint16(offset + 26, true) + view.getUint16(offset + 28, true);
    out[name.replace(/\.npy$/, "")] = parseNpy(buf.slice(start, start + size));
    at += 46 + nameLen + extraLen + commentLen;
  }
  return out;
}
