// The wire format (docs/protocol.md section 3): binary tensor messages, version 1.

const DTYPES = { float32: [1, 4, Float32Array], int64: [3, 8, BigInt64Array], int32: [4, 4, Int32Array] };
const BY_CODE = { 1: ["float32", Float32Array, 4], 3: ["int64", BigInt64Array, 8], 4: ["int32", Int32Array, 4] };
const pad8 = (n) => (n + 7) & ~7;

// tensors: [{name, dtype, shape, data (a typed array of that dtype)}]; meta: an object or null (M = 0).
export function encode(tensors, meta = null) {
  const metaBytes = meta === null ? new Uint8Array(0) : new TextEncoder().encode(JSON.stringify(meta));
  let size = pad8(16 + metaBytes.length);
  for (const t of tensors) size = pad8(pad8(size + 4 + t.name.length + 4 * t.shape.length) + t.data.byteLength);
  const buf = new ArrayBuffer(size), view = new DataView(buf), bytes = new Uint8Array(buf);
  bytes.set([0x44, 0x50, 0x41, 0x57]);
  view.setUint16(4, 1, true); view.setUint16(6, tensors.length, true);
  view.setUint32(8, metaBytes.length, true); view.setUint32(12, 0, true);
  bytes.set(metaBytes, 16);
  let at = pad8(16 + metaBytes.length);
  for (const t of tensors) {
    const [code, itemsize] = DTYPES[t.dtype];
    if (t.data.length !== t.shape.reduce((a, b) => a * b, 1)) throw new Error(`tensor ${t.name}: data does not fit its shape`);
    view.setUint16(at, t.name.length, true); view.setUint8(at + 2, code); view.setUint8(at + 3, t.shape.length);
    for (let i = 0; i < t.name.length; i++) bytes[at + 4 + i] = t.name.charCodeAt(i);
    t.shape.forEach((d, i) => view.setUint32(at + 4 + t.name.length + 4 * i, d, true));
    at = pad8(at + 4 + t.name.length + 4 * t.shape.length);
    bytes.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.length * itemsize), at);  // little-endian hosts
    at = pad8(at + t.data.length * itemsize);
  }
  return buf;
}

// -> {meta, tensors: {name: {dtype, shape, data}}}; throws on anything malformed.
export function decode(buf) {
  const view = new DataView(buf), bytes = new Uint8Array(buf);
  if (buf.byteLength < 16 || String.fromCharCode(...bytes.subarray(0, 4)) !== "DPAW") throw new Error("not a dpa wire message");
  if (view.getUint16(4, true) !== 1) throw new Error(`wire version ${view.getUint16(4, true)} is not 1`);
  const count = view.getUint16(6, true), metaLen = view.getUint32(8, true);
  const meta = metaLen ? JSON.parse(new TextDecoder().decode(bytes.subarray(16, 16 + metaLen))) : {};
  let at = pad8(16 + metaLen);
  const tensors = {};
  for (let n = 0; n < count; n++) {
    const len = view.getUint16(at, true), code = view.getUint8(at + 2), ndim = view.getUint8(at + 3);
    const name = String.fromCharCode(...bytes.subarray(at + 4, at + 4 + len));
    const shape = Array.from({ length: ndim }, (_, i) => view.getUint32(at + 4 + len + 4 * i, true));
    at = pad8(at + 4 + len + 4 * ndim);
    if (!(code in BY_CODE)) throw new Error(`tensor ${name}: dtype code ${code} not handled by the web device`);
    const [dtype, Typed, itemsize] = BY_CODE[code];
    const numel = shape.reduce((a, b) => a * b, 1);
    if (at + numel * itemsize > buf.byteLength) throw new Error(`tensor ${name} runs past the message`);
    tensors[name] = { dtype, shape, data: new Typed(buf.slice(at, at + numel * itemsize)) };
    at = pad8(at + numel * itemsize);
  }
  if (at !== buf.byteLength) throw new Error("trailing bytes after the last tensor");
  return { meta, tensors };
}
