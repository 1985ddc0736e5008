// The tbfeat dashboard: TensorBoard loads this module in an iframe and calls render().
export async function render() {
  const style = document.createElement('link');
  style.rel = 'stylesheet';
  style.href = new URL('./static/style.css', import.meta.url).href;
  document.head.appendChild(style);
  const {start} = await import('./static/app.js');
  await start(document.body);
}
