// Audio worklet: microphone samples (the AudioContext runs at 16 kHz) -> 20 ms PCM16 frames.
class Pcm16Frames extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frame = new Int16Array(320);
    this.fill = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      let peak = 0;
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        peak = Math.max(peak, Math.abs(s));
        this.frame[this.fill++] = s < 0 ? s * 32768 : s * 32767;
        if (this.fill === this.frame.length) {
          this.port.postMessage({ pcm: this.frame.buffer, peak }, [this.frame.buffer]);
          this.frame = new Int16Array(320);
          this.fill = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("pcm16-frames", Pcm16Frames);
