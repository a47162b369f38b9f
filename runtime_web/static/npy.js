// A float32 .npy file (NumPy format 1.0-3.0, little-endian, C order) -> {shape, data: Float32Array}.
export function parseNpy(buf) {
  const bytes = new Uint8Array(buf), view = new DataView(buf);
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.subarray(1, 6)) !== "NUMPY") throw new Error("not a .npy file");
  const major = bytes[6];
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLen));
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) throw new Error(`not a C-order float32 array: ${header}`);
  const shape = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const numel = shape.reduce((a, b) => a * b, 1);
  return { shape, data: new Float32Array(buf.slice(start + headerLen, start + headerLen + 4 * numel)) };
}
