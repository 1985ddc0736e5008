// The dashboard's one owner of its state: what is shown (run, image, steps, stages, mode,
// view) is read from the address, changed only through App.set, written back to the
// address, and drawn by the views (compare.js, drift.js, channel.js).
import * as api from './api.js';
import * as address from './state.js';
import {el, select} from './dom.js';
import {renderCompare} from './compare.js';
import {renderDrift} from './drift.js';
import {renderChannel} from './channel.js';

const VIEWS = [['compare', 'Compare'], ['drift', 'Drift map'], ['channel', 'Channel over time']];
const MODES = ['grid', 'cam', 'both'];

export async function start(root) {
  const app = new App(root);
  await app.load();
  return app;
}

class App {
  constructor(root) {
    this.root = root;
    this.infos = new Map();
    this.state = {};
  }

  async load() {
    this.root.replaceChildren(el('p', {class: 'note'}, 'Loading the runs tbfeat wrote…'));
    try {
      this.runs = await api.json('runs');
    } catch (e) {
      this.root.replaceChildren(el('p', {class: 'error'}, String(e.message || e)));
      return;
    }
    if (!this.runs.length) {
      this.root.replaceChildren(el('p', {class: 'note'},
        'No run with tbfeat grids or maps in this logdir yet.'));
      return;
    }
    document.addEventListener('keydown', (e) => this.key(e));
    await this.set(address.read(), false);
  }

  async info(run) {
    if (!this.infos.has(run)) this.infos.set(run, await api.json('run', {run}));
    return this.infos.get(run);
  }

  // Apply changes to the state, complete it from the runs, write the address, draw.
  async set(changes, keep = true) {
    const next = keep ? {...this.state, ...changes} : {...changes};
    this.state = await this.complete(next);
    address.write(this.state);
    this.draw();
  }

  async complete(s) {
    const names = this.runs.map((r) => r.run);
    if (!names.includes(s.run)) s.run = names[0];
    if (s.runB && (!names.includes(s.runB) || s.runB === s.run)) s.runB = '';
    const info = await this.info(s.run);
    if (s.runB) await this.info(s.runB);
    if (!info.images.includes(s.image)) s.image = info.images[0];
    const all = info.steps.all;
    let steps = address.ints(s.steps).filter((t) => all.includes(t));
    if (!steps.length && all.length) {
      steps = [...new Set([all[0], all[Math.floor((all.length - 1) / 2)], all[all.length - 1]])];
    }
    s.steps = steps.sort((a, b) => a - b).join(',');
    const bases = info.outputs.map((o) => o.base);
    s.stages = address.list(s.stages).filter((b) => bases.includes(b)).join(',');
    if (!MODES.includes(s.mode)) s.mode = 'grid';
    const alpha = Number(s.alpha);
    s.alpha = s.alpha !== undefined && s.alpha !== '' && alpha >= 0 && alpha <= 1
      ? String(alpha) : String(info.cam.alpha);
    if (!VIEWS.some(([v]) => v === s.view)) s.view = 'compare';
    if (s.drift !== 'first') s.drift = 'delta';
    return s;
  }

  get steps() { return address.ints(this.state.steps); }
  get stages() { return address.list(this.state.stages); }

  // ←/→ move every step column to the logged step before or after it.
  key(e) {
    if (this.state.view !== 'compare' || !['ArrowLeft', 'ArrowRight'].includes(e.key)) return;
    if (e.target && ['INPUT', 'SELECT', 'TEXTAREA'].includes(e.target.tagName)) return;
    const all = this.infos.get(this.state.run).steps.all;
    const by = e.key === 'ArrowLeft' ? -1 : 1;
    const moved = this.steps.map((t) => all[Math.min(all.length - 1,
      Math.max(0, all.indexOf(t) + by))]);
    e.preventDefault();
    this.set({steps: [...new Set(moved)].join(',')});
  }

  draw() {
    const main = el('main', {class: `view-${this.state.view}`});
    this.root.replaceChildren(this.toolbar(), main);
    const views = {compare: renderCompare, drift: renderDrift, channel: renderChannel};
    // data-ready: 1 once every cell of the view is drawn (what tests and screenshots await)
    document.body.dataset.ready = '0';
    Promise.resolve(views[this.state.view](this, main)).catch((e) => {
      main.append(el('p', {class: 'error'}, String(e.message || e)));
    }).finally(() => { document.body.dataset.ready = '1'; });
  }

  toolbar() {
    const s = this.state;
    const runs = this.runs.map((r) => [r.run, `${r.run} (${r.steps} step${r.steps === 1 ? "" : "s"})`]);
    const info = this.infos.get(s.run);
    return el('header', {class: 'toolbar'},
      el('nav', {}, VIEWS.map(([v, label]) => el('button', {
        class: v === s.view ? 'tab active' : 'tab', dataset: {view: v},
        onclick: () => this.set({view: v}),
      }, label))),
      el('label', {}, 'run ', select(runs, s.run, (run) => this.set({run}), {id: 'run'})),
      el('label', {}, 'beside ', select([['', '—'], ...runs.filter(([r]) => r !== s.run)],
        s.runB || '', (runB) => this.set({runB}), {id: 'runB'})),
      el('label', {}, 'image ', select(info.images.map((i) => [i, i]), s.image,
        (image) => this.set({image}), {id: 'image'})),
    );
  }
}
